"""A full disk in any stage: one line, the earlier outputs intact, and a rerun that ends where a clean run would.

The project is tests/helpers/fault_trials.py's small default-shaped one, run once to the end with `dvc repro`. Each case
copies it and reruns one stage, as dvc.yaml runs it, under a file-size limit (RLIMIT_FSIZE, half the stage's largest
output file: the write fails with EFBIG, as it would with ENOSPC on a full disk), then again without the limit.
The shard and checkpoint writes also have their own tests in test_stage_faults.py (resume from the newest
checkpoint, `pipeline.shard --check`); here the shard case goes through `dvc repro` itself.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from tests.helpers import fault_trials
from tests.helpers.project import run
from tests.helpers.faults import assert_one_error_line, leftovers, run_module



@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """The fault-trial project after a complete `dvc repro` (pretrain: 10 steps, a checkpoint every 5)."""
    proj = fault_trials.make_project(tmp_path_factory.mktemp("disk-full") / "proj", steps=10)
    fault_trials._check([sys.executable, "-m", "dvc", "repro"], proj)
    return proj


def rewritten_outputs(proj: Path, stage: str) -> list[Path]:
    """The outs, metrics and plots dvc.yaml declares for ``stage`` that a rerun writes again (``persist`` ones, such
    as pretrain's checkpoints, are kept and resumed from)."""
    entry = yaml.safe_load((proj / "dvc.yaml").read_text())["stages"][stage]
    paths = []
    for key in ("outs", "metrics", "plots"):
        for item in entry.get(key, []):
            path, options = (item, {}) if isinstance(item, str) else next(iter(item.items()))
            if not options.get("persist"):
                paths.append(proj / path)
    return paths


def largest_file(paths: list[Path]) -> int:
    files = [p for path in paths for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file()]
    return max(f.stat().st_size for f in files)


@pytest.mark.parametrize("stage", ["download", "clean", "tokenizer", "pretrain", "evaluate", "export"])
def test_disk_full_in_a_stage_is_one_line_and_the_rerun_matches(finished, tmp_path, stage):
    proj = tmp_path / "proj"
    shutil.copytree(finished, proj, symlinks=True)
    before = fault_trials.snapshot(proj)
    limit = largest_file(rewritten_outputs(proj, stage)) // 2

    full = run_module(f"pipeline.{stage}", cwd=proj, limit_bytes=limit)
    line = assert_one_error_line(full, stage, "disk full", "File too large", "free space",
                                 f"rerun `dvc repro {stage}`")
    assert ".tmp-" not in line, line          # names the output, not its temporary
    assert fault_trials.differences(before, fault_trials.snapshot(proj)) == []
    assert leftovers(proj / "data") == [] and leftovers(proj / "reports") == []

    again = run_module(f"pipeline.{stage}", cwd=proj)   # space freed
    assert again.returncode == 0, again.stderr[-2000:]
    assert fault_trials.differences(before, fault_trials.snapshot(proj)) == []


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs prlimit (util-linux)")
def test_disk_full_under_dvc_repro_keeps_the_recorded_shards_and_reruns(finished, tmp_path):
    """`dvc repro` of a changed shard stage on a full disk: the stage fails with one line, dvc.lock still records the
    previous shards, `dvc checkout` gives them back whole, and once there is space `dvc repro` finishes the change."""
    proj = tmp_path / "proj"
    shutil.copytree(finished, proj, symlinks=True)
    shards = proj / "data" / "shards"
    lock_before = (proj / "dvc.lock").read_text()
    shards_before = {p.relative_to(shards): p.read_bytes() for p in shards.rglob("*") if p.is_file()}
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["shard"]["rows_per_shard"] = 150   # was 100
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True))
    # The full disk for the stage's command only: DVC itself (its lock, its cache) still has room.
    dvc_yaml = (proj / "dvc.yaml").read_text()
    limit = min(p.stat().st_size for p in shards.rglob("*.parquet")) // 2
    limited = dvc_yaml.replace("cmd: python -m pipeline.shard",
                               f"cmd: prlimit --fsize={limit} python -m pipeline.shard")
    assert limited != dvc_yaml
    (proj / "dvc.yaml").write_text(limited)

    failed = run([sys.executable, "-m", "dvc", "repro", "shard"], proj, check=False, timeout=300)
    assert failed.returncode != 0
    errors = [line for line in (failed.stdout + failed.stderr).splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: [shard] disk full while writing data/shards"), errors
    assert "Traceback" not in failed.stdout + failed.stderr
    # nothing half-written was recorded: the shard stage's entry is the previous run's (the params check, which
    # passed, records the new value of shard.rows_per_shard in its own entry)
    assert yaml.safe_load((proj / "dvc.lock").read_text())["stages"]["shard"] == \
        yaml.safe_load(lock_before)["stages"]["shard"]
    assert "untouched" not in errors[0] and errors[0].endswith("`dvc checkout data/shards` restores it"), errors[0]

    run([sys.executable, "-m", "dvc", "checkout", "data/shards"], proj)
    assert {p.relative_to(shards): p.read_bytes() for p in shards.rglob("*") if p.is_file()} == shards_before
    check = run([sys.executable, "-m", "pipeline.shard", "--check"], proj, check=False)
    assert check.returncode == 0 and "ok:" in check.stderr, check.stderr[-2000:]

    (proj / "dvc.yaml").write_text(dvc_yaml)                        # space freed
    run([sys.executable, "-m", "dvc", "repro", "shard"], proj, timeout=300)
    assert 100 < max(pq.ParquetFile(p).metadata.num_rows for p in shards.rglob("*.parquet")) <= 150
    assert run([sys.executable, "-m", "dvc", "status", "shard"], proj).stdout.strip().endswith("up to date.")
    assert leftovers(proj / "data") == []
