"""Fault-injection trials: SIGKILL `dvc repro` at a random moment inside a random stage, rerun it, compare.

    python bench/fault_trials.py --trials 50 --seed 1

builds a small default-shaped project (a temporary git repo with `dvc init`, this checkout's dvc.yaml, pipeline/ and
xlm_core/, a params.yaml whose only source is a fixture multi-parallel en/fr/ru corpus written here), runs it once
without interruption (the reference), then for each trial:

1. copies the project as it was before any output;
2. starts `dvc repro` in its own process group, waits for the chosen stage's "Running stage 'X'" line on DVC's
   stdout, sleeps a random fraction of that stage's duration in the reference run (DVC's own hashing and caching
   after the command are part of that window) and SIGKILLs the process group;
3. checks that no process of the killed run survived (torchrun starts its workers in a session of their own);
4. reruns `dvc repro` to the end, as a user would, and says so in the trial's line when it had to: a dvc.lock that
   the kill cut short while DVC itself was rewriting it (DVC writes it in place) loses its partial last lines and the
   entries DVC's schema rejects (`repair_lockfile`); a failed rerun is tried once more, after removing
   ``.dvc/tmp/rwlock`` if DVC blamed a stale lock;
5. compares everything with the reference run.

What is compared (each item must equal the reference):

- dvc.lock: per stage, the md5 of every dep and out, except ``metrics/pretrain.json``, ``metrics/summary.json`` and
  ``dvclive/pretrain/plots/metrics``, which hold wall-clock figures (their deterministic content is compared below);
- the bytes of every file under ``data/`` (``data/.download-cache/`` aside: the download stage's resumable scratch,
  not an output), ``metrics/`` (all but pretrain.json) and ``reports/``, and the list of those files (a leftover
  ``*.tmp-*`` / ``*.old-*`` temporary counts as a mismatch);
- ``metrics/summary.json`` without its pace figures ``tok/s`` and ``minutes``;
- ``metrics/pretrain.json`` without its keys ``seconds`` (wall-clock training time), ``tokens_per_s`` and
  ``loader_stall_fraction`` (derived from wall-clock times) and ``resumed_from`` (the step a resumed run started
  from, 0 for an uninterrupted one);
- ``dvclive/pretrain/plots/metrics/**/*.tsv`` without the ``timestamp`` column; for the throughput series
  (``train/tokens_per_s``, ``train/mfu``, ``train/hfu``) only the ``step`` column, whose values are timings;
- ``dvc status`` is clean after the rerun (every hash dvc.lock records matches the workspace).

A "corrupt output recorded in dvc.lock" is an out whose md5 in dvc.lock differs from the reference's, or one that
``dvc status`` says no longer matches the workspace: DVC committed (and would push) bytes a clean run would not have
produced. The last line is ``N trials, M mismatches, K corrupt outputs recorded in dvc.lock``, after a line counting
the kills that hit DVC's own dvc.lock write and the reruns that needed a second `dvc repro`; the exit status is 1
when M or K is not 0.
"""
from __future__ import annotations

import argparse
import dataclasses
import gzip
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
STAGE_LINE = "Running stage '"
# What DVC would say if a killed run's lock were still held (DVC's locks die with the process: not seen so far).
STALE_LOCK_MESSAGES = ("Unable to acquire lock", "rwlock", "is busy, it is being blocked by")
# Outputs whose bytes carry wall-clock figures: compared by their deterministic content only (see the docstring).
TIMED_OUTS = ("metrics/pretrain.json", "metrics/summary.json", "dvclive/pretrain/plots/metrics")
SUMMARY_TIMING_KEYS = ("tok/s", "minutes")   # metrics/summary.json's pace figures (from pretrain.json's timings)
# wall-clock figures, and the step a resumed run started from (0 for an uninterrupted one)
PRETRAIN_TIMING_KEYS = ("seconds", "tokens_per_s", "loader_stall_fraction", "resumed_from")
THROUGHPUT_SERIES = ("tokens_per_s", "mfu", "hfu")
COMPARED_DIRS = ("data", "metrics", "reports")
NOT_OUTPUTS = ("data/.download-cache",)

# Pretrain steps: enough that training (a checkpoint every 5 steps, 2 kept) is a good part of the stage's time, not
# only its start-up, so kills land between checkpoints and in their writes and pruning too.
DEFAULT_STEPS = 200
LANGUAGES = ["en", "fr", "ru"]
PAIRS = ["en-fr", "en-ru"]
# One word per concept and language, so line k of every language says the same thing (a multi-parallel corpus).
WORDS = {
    "en": ("water fire earth wind light night day sun moon star tree river mountain house city king queen child "
           "mother father friend bread wine book road sea ship bird horse dog cat stone gold silver song word heart "
           "hand eye time year").split(),
    "fr": ("eau feu terre vent lumière nuit jour soleil lune étoile arbre rivière montagne maison ville roi reine "
           "enfant mère père ami pain vin livre route mer navire oiseau cheval chien chat pierre or argent chanson "
           "mot cœur main œil temps année").split(),
    "ru": ("вода огонь земля ветер свет ночь день солнце луна звезда дерево река гора дом город король королева "
           "ребёнок мать отец друг хлеб вино книга дорога море корабль птица конь собака кошка камень золото "
           "серебро песня слово сердце рука глаз время год").split(),
}


# ------------------------------------------------------------------------------------------------------ the project
def write_corpus(path: Path, lines: int = 300, seed: int = 0) -> None:
    """A gzipped TSV, one aligned en/fr/ru segment per line, plus a few lines the download stage must drop."""
    rng = random.Random(seed)
    rows = []
    for _ in range(lines):
        concepts = [min(int(rng.paretovariate(1.1)) - 1, len(WORDS["en"]) - 1) for _ in range(rng.randint(4, 12))]
        rng.shuffle(concepts)
        cells = []
        for lang in LANGUAGES:
            text = " ".join(WORDS[lang][c] for c in concepts)
            cells.append(text[0].upper() + text[1:] + ".")
        rows.append("\t".join(cells).encode())
    rows[17] = b"bad \xff\xfe utf-8\tmauvais\t\xd0"   # invalid UTF-8: dropped and counted
    rows[42] = b"nul\x00byte\tnul\tnul"                 # NUL byte: dropped and counted
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.GzipFile(path, "wb", mtime=0) as fh:      # mtime 0: the same bytes every time
        fh.write(b"\n".join(rows) + b"\n")


def fixture_params(steps: int = DEFAULT_STEPS) -> dict:
    """This checkout's params.yaml, shrunk: the fixture corpus, a 200-piece vocabulary, the tiny model."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    params["languages"] = list(LANGUAGES)
    params["pairs"] = list(PAIRS)
    params["download"]["sources"] = [{
        "name": "fixture", "kind": "local", "path": "corpus/parallel.tsv.gz", "format": "tsv",
        "columns": {lang: i for i, lang in enumerate(LANGUAGES)}, "parallel": True, "languages": list(LANGUAGES)}]
    params["clean"].update(split={"valid": 0.1, "test": 0.1}, batch_rows=100)
    params["tokenizer"].update(vocab_size=200, max_sentences=2000, threads=1)
    params["shard"].update(rows_per_shard=100, batch_rows=100, threads=1)
    params["pretrain"].update(
        model={"preset": "tiny", "dropout": 0.1, "attention_dropout": 0.0},
        seq_len=32, batch_size=8, accum_steps=1, objectives={"mlm": 1.0, "tlm": 0.5},
        adversarial={"weight": 0.1, "lambda_max": 0.5, "warmup_steps": 5, "hidden": 32},
        optimizer={**params["pretrain"]["optimizer"], "lr": 0.002, "warmup_steps": 5},
        steps=steps, eval_every=50, eval_batches=2, checkpoint_every=5, keep_checkpoints=2, log_every=5,
        dtype="fp32", device="cpu", threads=1)
    if "evaluate" in params:
        params["evaluate"].update(seq_len=32, batch_size=8, max_batches=2, max_retrieval_pairs=50,
                                  probe={"steps": 20, "lr": 0.05, "l2": 0.001}, device="cpu", threads=1)
    return params


def project_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update({"DVC_NO_ANALYTICS": "1", "DO_NOT_TRACK": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                "GIT_AUTHOR_NAME": "trial", "GIT_AUTHOR_EMAIL": "trial@example.com",
                "GIT_COMMITTER_NAME": "trial", "GIT_COMMITTER_EMAIL": "trial@example.com"})
    return env


def _check(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=project_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def make_project(proj: Path, steps: int = DEFAULT_STEPS, lines: int = 300) -> Path:
    """A git + DVC repo with this checkout's pipeline and the fixture params, before any output."""
    proj.mkdir(parents=True)
    _check(["git", "init", "-q"], proj)
    _check([sys.executable, "-m", "dvc", "init", "-q"], proj)
    _check([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], proj)
    shutil.copy(ROOT / "dvc.yaml", proj / "dvc.yaml")
    # dvc.yaml's deps name these files, and `python -m` finds the project's copy first: every trial runs the code of
    # this checkout as it was when the template was made, whatever is edited meanwhile.
    for pkg in ("pipeline", "xlm_core"):
        shutil.copytree(ROOT / pkg, proj / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (proj / "params.yaml").write_text(yaml.safe_dump(fixture_params(steps), sort_keys=False, allow_unicode=True),
                                      encoding="utf-8")
    write_corpus(proj / "corpus" / "parallel.tsv.gz", lines)
    (proj / ".gitignore").write_text("/data/\n__pycache__/\n/dvclive/\n")
    return proj


def dvc_stages(proj: Path) -> list[str]:
    return list(yaml.safe_load((proj / "dvc.yaml").read_text())["stages"])


# ---------------------------------------------------------------------------------------------------- running DVC
@dataclasses.dataclass
class Repro:
    returncode: int | None            # None: killed by us
    stage_starts: dict[str, float]    # stage -> seconds after launch when DVC announced it
    seconds: float
    output: str
    killed_at: float | None = None    # seconds after the stage's start
    survivors: list[str] = dataclasses.field(default_factory=list)


def _children_of() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (whatever its process group or session)."""
    tree, found, todo = _children_of(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _alive(pid: int) -> str | None:
    """The command line of ``pid`` if it still runs (zombies count as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat[stat.rindex(")") + 2] == "Z":
            return None
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except (OSError, ValueError):
        return None


def repro(proj: Path, kill_stage: str | None = None, kill_after: float = 0.0, target: str | None = None,
          timeout: float = 1800) -> Repro:
    """Run `dvc repro [target]` in ``proj``; with ``kill_stage``, SIGKILL its process group ``kill_after`` seconds
    into that stage."""
    log_path = proj.parent / f"{proj.name}.log"
    started = time.monotonic()
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"\n=== dvc repro (kill {kill_stage} after {kill_after:.2f}s) ===\n")
        log.flush()
        cmd = [sys.executable, "-m", "dvc", "repro", *([target] if target else [])]
        proc = subprocess.Popen(cmd, cwd=proj, env=project_env(),
                                stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True)
        starts: dict[str, float] = {}
        lines: list[str] = []
        announced = threading.Event()

        def read_stdout() -> None:
            for line in proc.stdout:  # type: ignore[union-attr]
                lines.append(line)
                log.write(line)
                log.flush()
                if line.startswith(STAGE_LINE):
                    stage = line.split("'")[1]
                    starts[stage] = time.monotonic() - started
                    if stage == kill_stage:
                        announced.set()

        reader = threading.Thread(target=read_stdout, daemon=True)
        reader.start()
        result = Repro(returncode=None, stage_starts=starts, seconds=0.0, output="")
        if kill_stage is not None:
            while not announced.wait(0.05):
                if proc.poll() is not None or time.monotonic() - started > timeout:
                    break
            if announced.is_set():
                time.sleep(kill_after)
                tree = descendants(proc.pid)
                result.killed_at = time.monotonic() - started - starts[kill_stage]
                with _ignore(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                result.survivors = _survivors(tree)
        try:
            proc.wait(timeout=max(1.0, timeout - (time.monotonic() - started)))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        reader.join(10)
        result.seconds = time.monotonic() - started
        result.output = "".join(lines)
        if result.killed_at is None:
            result.returncode = proc.returncode
    return result


class _ignore:
    def __init__(self, *exc):
        self.exc = exc

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        return kind is not None and issubclass(kind, self.exc)


def _survivors(pids: list[int], grace: float = 5.0) -> list[str]:
    """Processes of the killed tree still running after ``grace`` seconds; they are killed (and reported)."""
    deadline = time.monotonic() + grace
    while True:
        alive = {pid: cmd for pid in pids if (cmd := _alive(pid))}
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    for pid in alive:
        with _ignore(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return [f"{pid}: {cmd[:120]}" for pid, cmd in alive.items()]


def stage_durations(run: Repro, stages: list[str]) -> dict[str, float]:
    """Seconds from each stage's announcement to the next one's (the last one: to the end of `dvc repro`)."""
    ordered = sorted(run.stage_starts.items(), key=lambda kv: kv[1])
    ends = [t for _s, t in ordered[1:]] + [run.seconds]
    return {stage: end - start for (stage, start), end in zip(ordered, ends) if stage in stages}


# ------------------------------------------------------------------------------------------------------- snapshots
def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _lock_hashes(proj: Path) -> dict[str, str]:
    """``stage:deps|outs:path -> md5`` from dvc.lock, the timed outputs left out."""
    lock_path = proj / "dvc.lock"
    if not lock_path.exists():
        return {}
    lock = yaml.safe_load(lock_path.read_text()) or {}
    hashes = {}
    for stage, entry in (lock.get("stages") or {}).items():
        for kind in ("deps", "outs"):
            for item in entry.get(kind) or []:
                if item["path"] in TIMED_OUTS:
                    continue
                hashes[f"{stage}:{kind}:{item['path']}"] = str(item.get("md5") or item.get("hash"))
    return hashes


def _normalised_tsv(path: Path) -> str:
    lines = path.read_text().splitlines()
    if not lines:
        return ""
    header = lines[0].split("\t")
    throughput = path.stem in THROUGHPUT_SERIES
    keep = [i for i, col in enumerate(header) if col != "timestamp" and (not throughput or col == "step")]
    return "\n".join("\t".join(row.split("\t")[i] for i in keep if i < len(row.split("\t"))) for row in lines)


def snapshot(proj: Path) -> dict[str, str]:
    """Everything compared: lock hashes, file digests, the deterministic content of the timed outputs."""
    snap = {f"lock {k}": v for k, v in _lock_hashes(proj).items()}
    for top in COMPARED_DIRS:
        base = proj / top
        if not base.exists():
            continue
        for path in sorted(base.rglob("*")):
            rel = path.relative_to(proj).as_posix()
            if path.is_dir() or any(rel == n or rel.startswith(n + "/") for n in NOT_OUTPUTS) or rel in TIMED_OUTS:
                continue
            snap[f"file {rel}"] = _md5(path)
    pretrain = proj / "metrics" / "pretrain.json"
    if pretrain.exists():
        metrics = json.loads(pretrain.read_text())
        for key in PRETRAIN_TIMING_KEYS:
            metrics.pop(key, None)
        snap["content metrics/pretrain.json"] = json.dumps(metrics, sort_keys=True)
    summary = proj / "metrics" / "summary.json"
    if summary.exists():
        figures = {k: v for k, v in json.loads(summary.read_text()).items() if k not in SUMMARY_TIMING_KEYS}
        snap["content metrics/summary.json"] = json.dumps(figures, sort_keys=True)
    plots = proj / "dvclive" / "pretrain" / "plots" / "metrics"
    for tsv in sorted(plots.rglob("*.tsv")) if plots.exists() else []:
        snap[f"content {tsv.relative_to(proj).as_posix()}"] = _normalised_tsv(tsv)
    return snap


def differences(reference: dict[str, str], got: dict[str, str]) -> list[str]:
    out = []
    for key in sorted(set(reference) | set(got)):
        if key not in got:
            out.append(f"missing {key}")
        elif key not in reference:
            out.append(f"extra {key}")
        elif reference[key] != got[key]:
            out.append(f"differs {key}")
    return out


def dvc_status_dirty(proj: Path, target: str | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "dvc", "status", "--json", *([target] if target else [])]
    proc = subprocess.run(cmd, cwd=proj, env=project_env(),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return [f"dvc status failed: {proc.stderr.strip().splitlines()[-1:]}"]
    status = json.loads(proc.stdout or "{}")
    return [f"dvc status: {stage}: {json.dumps(changes)}" for stage, changes in status.items()]


# ----------------------------------------------------------------------------------------------------------- trials
@dataclasses.dataclass
class Trial:
    index: int
    stage: str
    planned_delay: float
    killed_at: float | None = None
    rerun_seconds: float = 0.0
    mismatches: list[str] = dataclasses.field(default_factory=list)
    corrupt_in_lock: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    def line(self) -> str:
        when = f"{self.killed_at:.2f}s" if self.killed_at is not None else "never (the stage did not start)"
        verdict = "match" if not self.mismatches else f"MISMATCH ({len(self.mismatches)}): " + "; ".join(
            self.mismatches[:8]) + (" ..." if len(self.mismatches) > 8 else "")
        notes = f" [{'; '.join(self.notes)}]" if self.notes else ""
        return (f"trial {self.index}: killed in {self.stage} at {when} (planned {self.planned_delay:.2f}s), "
                f"rerun {self.rerun_seconds:.0f}s: {verdict}{notes}")


def repair_lockfile(proj: Path) -> str | None:
    """What a user does when the kill hit DVC's own (non-atomic) write of dvc.lock: drop what DVC's schema rejects.

    DVC rewrites dvc.lock in place after each stage; a kill in that instant can leave a truncated file the next
    `dvc repro` refuses ("required key not provided, in schema"). Stage entries that do not validate are removed (all
    of the file when it is not YAML any more); DVC then reruns those stages or restores them from its run cache.
    Returns what was done, or None when dvc.lock was fine.
    """
    import voluptuous
    from dvc.schema import COMPILED_LOCK_FILE_STAGE_SCHEMA, COMPILED_LOCKFILE_SCHEMA

    lock_path = proj / "dvc.lock"
    if not lock_path.exists():
        return None
    lines = lock_path.read_text().splitlines()
    for cut in range(min(len(lines), 20)):   # a write cut mid-line: its last lines are not YAML
        try:
            lock = yaml.safe_load("\n".join(lines[:len(lines) - cut]))
            break
        except yaml.YAMLError:
            continue
    else:
        lock = cut = None
    if cut == 0:
        try:
            COMPILED_LOCKFILE_SCHEMA(lock)
            return None
        except voluptuous.Invalid:
            pass
    stages = lock.get("stages") if isinstance(lock, dict) else None
    kept = {}
    for name, entry in (stages if isinstance(stages, dict) else {}).items():
        try:
            COMPILED_LOCK_FILE_STAGE_SCHEMA(entry)
        except voluptuous.Invalid:
            continue
        kept[name] = entry
    if not kept:
        lock_path.unlink()
        return "dvc.lock was cut short by the kill (DVC's own write) before any whole stage entry: deleted it"
    lock_path.write_text(yaml.safe_dump({"schema": "2.0", "stages": kept}, sort_keys=False))
    return (f"dvc.lock was cut short by the kill (DVC's own write): kept the whole entries of {list(kept)}, "
            f"dropped the rest")


def _rerun_to_the_end(proj: Path, trial: Trial, target: str | None) -> bool:
    """`dvc repro` after the kill, the way a user would: a damaged dvc.lock repaired first (DVC's write, reported
    in the trial's notes), and a second `dvc repro` if the first fails (reported too), after deleting
    ``.dvc/tmp/rwlock`` if DVC blamed a stale lock."""
    repaired = repair_lockfile(proj)
    if repaired:
        trial.notes.append(repaired)
    for attempt in range(2):
        run = repro(proj, target=target)
        trial.rerun_seconds += run.seconds
        if run.returncode == 0:
            return True
        log = (proj.parent / f"{proj.name}.log").read_text(errors="replace").rsplit("=== dvc repro", 1)[-1]
        errors = [line for line in log.splitlines() if line.startswith(("ERROR", "error:"))]
        reason = (errors or log.strip().splitlines()[-1:] or ["(no output)"])[-1][:240]
        if attempt == 1:
            trial.mismatches.append(f"rerun failed twice ({run.returncode}): {reason}")
            return False
        trial.notes.append(f"first rerun failed ({run.returncode}): {reason}")
        if any(message in log for message in STALE_LOCK_MESSAGES):
            trial.notes.append("DVC refused a stale lock: removed .dvc/tmp/rwlock")
            (proj / ".dvc" / "tmp" / "rwlock").unlink(missing_ok=True)
    return False


def run_trial(index: int, template: Path, workdir: Path, stage: str, delay: float,
              reference: dict[str, str], keep: bool = False, target: str | None = None) -> Trial:
    trial = Trial(index=index, stage=stage, planned_delay=delay)
    proj = workdir / f"trial-{index:03d}"
    shutil.copytree(template, proj, symlinks=True)
    try:
        killed = repro(proj, kill_stage=stage, kill_after=delay, target=target)
        trial.killed_at = killed.killed_at
        if killed.killed_at is None:
            trial.notes.append(f"dvc repro ended ({killed.returncode}) before stage {stage} started")
        if killed.survivors:
            trial.mismatches.append(f"{len(killed.survivors)} process(es) survived the kill: "
                                    + " | ".join(killed.survivors))
        if _rerun_to_the_end(proj, trial, target):
            got = snapshot(proj)
            trial.mismatches += differences(reference, got)
            trial.corrupt_in_lock = [d for d in differences(reference, got) if d.startswith("differs lock ")
                                     and ":outs:" in d]
            dirty = dvc_status_dirty(proj, target)
            trial.mismatches += dirty
            trial.corrupt_in_lock += dirty
    finally:
        if not keep and not trial.mismatches and not trial.notes:
            shutil.rmtree(proj, ignore_errors=True)
            (workdir / f"{proj.name}.log").unlink(missing_ok=True)
    return trial


def build_reference(workdir: Path, steps: int, upto: str | None = None,
                    target: str | None = None) -> tuple[Path, dict[str, str], dict]:
    """The project template (built up to ``upto`` when given) and the reference run's snapshot and durations."""
    template = make_project(workdir / "template", steps=steps)
    if upto is not None:
        _check([sys.executable, "-m", "dvc", "repro", upto], template)
    ref = workdir / "reference"
    shutil.copytree(template, ref, symlinks=True)
    run = repro(ref, target=target)
    if run.returncode != 0:
        raise RuntimeError(f"the reference run failed; see {workdir / 'reference.log'}")
    stages = [s for s in dvc_stages(ref) if s in run.stage_starts]
    reference = snapshot(ref)
    again = dvc_status_dirty(ref, target)
    if again:
        raise RuntimeError(f"the reference run is not up to date after dvc repro: {again}")
    return template, reference, {"durations": stage_durations(run, stages), "seconds": run.seconds}


def run_trials(trials: int, seed: int, workdir: Path, steps: int = DEFAULT_STEPS, stages: list[str] | None = None,
               upto: str | None = None, target: str | None = None, keep: bool = False,
               out=sys.stdout) -> list[Trial]:
    started = time.monotonic()
    template, reference, info = build_reference(workdir, steps, upto, target)
    durations = info["durations"]
    print(f"reference run: {info['seconds']:.0f}s; stage durations: "
          + ", ".join(f"{s} {d:.1f}s" for s, d in durations.items()), file=out, flush=True)
    choices = [s for s in durations if stages is None or s in stages]
    if not choices:
        raise SystemExit(f"no stage to kill among {stages} (the reference ran {list(durations)})")
    rng = random.Random(seed)
    results = []
    for i in range(trials):
        stage = rng.choice(choices)
        delay = rng.random() * durations[stage]
        t0 = time.monotonic()
        trial = run_trial(i, template, workdir, stage, delay, reference, keep, target)
        results.append(trial)
        print(f"{trial.line()} ({time.monotonic() - t0:.0f}s)", file=out, flush=True)
    corrupt = sum(1 for t in results if t.corrupt_in_lock)
    mismatched = sum(1 for t in results if t.mismatches)
    elapsed = time.monotonic() - started
    second = sum(1 for t in results if any(n.startswith("first rerun failed") for n in t.notes))
    lockfile = sum(1 for t in results if any(n.startswith("dvc.lock was") for n in t.notes))
    never = sum(1 for t in results if t.killed_at is None)
    print(f"{lockfile} kill(s) hit DVC's own dvc.lock write (repaired as a user would); {second} trial(s) needed a "
          f"second `dvc repro`; {never} kill(s) came after `dvc repro` had ended", file=out, flush=True)
    print(f"{len(results)} trials, {mismatched} mismatches, {corrupt} corrupt outputs recorded in dvc.lock "
          f"({elapsed:.0f}s, {elapsed / max(1, len(results)):.0f}s per trial with the reference run)",
          file=out, flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0, help="picks the stages and kill moments")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="pretrain steps (a checkpoint every 5)")
    parser.add_argument("--stages", default=None, help="comma-separated stages to kill in (default: all)")
    parser.add_argument("--upto", default=None,
                        help="build the template up to this stage first, so trials start after it (quicker)")
    parser.add_argument("--target", default=None, help="`dvc repro TARGET`: stop after this stage (default: all)")
    parser.add_argument("--workdir", type=Path, default=None, help="kept when given (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep every trial's project, not only mismatching ones")
    args = parser.parse_args(argv)
    stages = args.stages.split(",") if args.stages else None
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        results = run_trials(args.trials, args.seed, args.workdir, args.steps, stages, args.upto, args.target,
                             args.keep)
    else:
        with tempfile.TemporaryDirectory(prefix="fault-trials-") as tmp:
            results = run_trials(args.trials, args.seed, Path(tmp), args.steps, stages, args.upto, args.target,
                                 args.keep)
    return 1 if any(t.mismatches or t.corrupt_in_lock for t in results) else 0


if __name__ == "__main__":
    sys.exit(main())
