"""Wall time of each stage of the default `dvc repro` from a clean state, of a no-op `dvc repro`, and the loader stall.

    python bench/pipeline.py                 # a fresh clone of this repository's HEAD in a temporary folder
    python bench/pipeline.py --keep DIR      # keep the project (data/, metrics) in DIR afterwards

Targets: the whole default run ≤ 15 minutes on 2 cores, a no-op `dvc repro` ≤ 3 s, the data
loader's stall < 2 % of pretrain's training time. Prints a table and one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed_repro(project: Path, env: dict) -> tuple[float, dict[str, float], str]:
    """Run `dvc repro`, timing each stage from its "Running stage" line to the next stage's (or the end)."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=project, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=1)
    stages: dict[str, float] = {}
    current, since = None, start
    log = []
    for line in proc.stdout:
        log.append(line)
        if line.startswith("Running stage '"):
            now = time.perf_counter()
            if current:
                stages[current] = now - since
            current, since = line.split("'")[1], now
    proc.wait()
    end = time.perf_counter()
    if current:
        stages[current] = end - since
    if proc.returncode != 0:
        sys.stderr.write("".join(log[-40:]))
        raise SystemExit(f"dvc repro failed with exit code {proc.returncode}")
    return end - start, stages, "".join(log)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="run in this folder and keep it")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="xlm-bench-"))
    project = work / "project"
    if project.exists():
        shutil.rmtree(project)
    subprocess.run(["git", "clone", "-q", str(ROOT), str(project)], check=True)
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(project)}
    total, stages, _ = timed_repro(project, env)
    noop_start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=project, env=env, check=True, capture_output=True)
    noop = time.perf_counter() - noop_start
    pretrain = json.loads((project / "metrics" / "pretrain.json").read_text())
    print(f"{'stage':<12}{'seconds':>10}")
    for name, seconds in stages.items():
        print(f"{name:<12}{seconds:>10.1f}")
    print(f"{'total':<12}{total:>10.1f}   (target ≤ 900 s on 2 cores)")
    print(f"{'no-op repro':<12}{noop:>10.2f}   (target ≤ 3 s)")
    stall = pretrain.get("loader_stall_fraction")
    print(f"loader stall during pretrain: {stall:.2%}   (target < 2 %)" if stall is not None else "no stall figure")
    print(json.dumps({"stages_s": stages, "total_s": total, "noop_s": noop, "loader_stall_fraction": stall,
                      "pretrain_tokens_per_s": pretrain.get("tokens_per_s"), "cores": os.cpu_count()}))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
