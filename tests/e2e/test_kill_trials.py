"""SIGKILL `dvc repro` at a random moment, rerun it, and get exactly what a clean run gives (bench/fault_trials.py).

The default suite (CI) runs four trials: `dvc repro shard` killed inside the shard stage (the project built up to
`tokenizer` beforehand), and three over every stage through the script's command line with a 20-step pretrain.
`python bench/fault_trials.py --trials 50` runs as many as you like. Pretrain's resume after a kill is also in
tests/integration/test_pretrain.py::test_exact_resume_after_sigkill and
tests/integration/faults/test_stage_faults.py::test_disk_full_while_writing_a_checkpoint_keeps_the_previous_one.
"""
from __future__ import annotations

import io
import sys

from tests.helpers import fault_trials
from tests.helpers.project import ROOT, project_env, run




# Where the kill lands depends on the machine's speed; a kill while DVC itself rewrites dvc.lock (it writes it in
# place) is repaired before the rerun as docs/errors.md tells a user to, and is not a mismatch.
def test_shard_killed_and_rerun_matches_a_clean_run(tmp_path):
    out = io.StringIO()
    # seed 0 kills ~3/4 into the stage (its announcement to DVC's lock update): shards or DVC's caching under way
    (trial,) = fault_trials.run_trials(1, seed=0, workdir=tmp_path, stages=["shard"], upto="tokenizer",
                                       target="shard", out=out)
    report = out.getvalue()
    assert trial.killed_at is not None, report
    assert trial.mismatches == [] and trial.corrupt_in_lock == [], report
    assert "1 trials, 0 mismatches, 0 corrupt outputs recorded in dvc.lock" in report


def test_a_mismatch_is_detected(tmp_path):
    """The comparison is not vacuous: one changed byte of a shard, one timing-free metric, one lock hash."""
    proj = tmp_path / "p"
    (proj / "data" / "shards").mkdir(parents=True)
    (proj / "data" / "shards" / "a.parquet").write_bytes(b"abc")
    (proj / "metrics").mkdir()
    (proj / "metrics" / "pretrain.json").write_text('{"seconds": 1.0, "resumed_from": 0, "valid": {"x": 1}}')
    (proj / "dvc.lock").write_text("schema: '2.0'\nstages:\n  shard:\n    outs:\n    - path: data/shards\n"
                                   "      md5: aaa.dir\n")
    reference = fault_trials.snapshot(proj)
    (proj / "metrics" / "pretrain.json").write_text('{"seconds": 9.0, "resumed_from": 5, "valid": {"x": 1}}')
    assert fault_trials.differences(reference, fault_trials.snapshot(proj)) == []   # timings only: no mismatch
    (proj / "data" / "shards" / "a.parquet").write_bytes(b"abd")
    (proj / "metrics" / "pretrain.json").write_text('{"seconds": 9.0, "resumed_from": 5, "valid": {"x": 2}}')
    (proj / "dvc.lock").write_text((proj / "dvc.lock").read_text().replace("aaa", "bbb"))
    (proj / "data" / "shards.tmp-1-dead").mkdir()
    (proj / "data" / "shards.tmp-1-dead" / "x").write_text("left over")
    assert fault_trials.differences(reference, fault_trials.snapshot(proj)) == [
        "differs content metrics/pretrain.json", "extra file data/shards.tmp-1-dead/x",
        "differs file data/shards/a.parquet", "differs lock shard:outs:data/shards"]


def test_a_dvc_lock_cut_by_the_kill_is_repaired_as_a_user_would(tmp_path):
    """DVC rewrites dvc.lock in place: cut anywhere, what is left after the repair is a lock file DVC accepts."""
    import yaml
    from dvc.schema import COMPILED_LOCKFILE_SCHEMA

    def stage(name: str) -> dict:
        return {"cmd": f"python -m pipeline.{name}",
                "deps": [{"path": f"pipeline/{name}.py", "hash": "md5", "md5": "0" * 32, "size": 10}],
                "outs": [{"path": f"data/{name}", "hash": "md5", "md5": "1" * 32 + ".dir", "size": 20,
                          "nfiles": 2}]}

    text = yaml.safe_dump({"schema": "2.0", "stages": {s: stage(s) for s in ("download", "clean", "tokenizer")}},
                          sort_keys=False)
    for cut in range(0, len(text), 7):
        (tmp_path / "dvc.lock").write_text(text[:cut])
        note = fault_trials.repair_lockfile(tmp_path)
        assert note is None or note.startswith("dvc.lock was")
        if (tmp_path / "dvc.lock").exists():
            COMPILED_LOCKFILE_SCHEMA(yaml.safe_load((tmp_path / "dvc.lock").read_text()))   # raises if rejected
    (tmp_path / "dvc.lock").write_text(text)
    assert fault_trials.repair_lockfile(tmp_path) is None and (tmp_path / "dvc.lock").read_text() == text


def test_a_killed_writers_leftover_goes_even_when_its_pid_is_a_zombie_or_reused(tmp_path):
    """The rerun may start before the killed writer is reaped (a zombie still owns its pid), and pid_max is often
    32768, so a leftover's pid may be a new process by then: trials saw both leave a scratch folder behind."""
    import os
    import subprocess
    import time

    from xlm_core.atomic import atomic_dir

    reused = tmp_path / f"clean.tmp-{os.getpid()}-work-abc"      # "our" pid, but written before we started
    reused.mkdir()
    (reused / "fixture.en.parquet").write_bytes(b"scratch of the killed run")
    before_us = time.time() - 3600
    os.utime(reused, (before_us, before_us))
    writer = subprocess.Popen([sys.executable, "-c", "import os, sys; os.makedirs(sys.argv[1])",
                               str(tmp_path / "clean.tmp-PID-work-def")])
    deadline = time.time() + 30
    while not (tmp_path / "clean.tmp-PID-work-def").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)                                                # exited, not yet reaped: a zombie
    zombie = tmp_path / f"clean.tmp-{writer.pid}-work-def"
    (tmp_path / "clean.tmp-PID-work-def").rename(zombie)
    try:
        with atomic_dir(tmp_path / "clean") as staging:
            (staging / "mono").mkdir()
            assert not reused.exists() and not zombie.exists()
            assert staging.exists()                                # a live writer's own temporary stays
    finally:
        writer.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean"]


def test_curves_cut_by_a_kill_are_truncated_to_the_resumed_checkpoint(tmp_path):
    """dvclive appends rows as training goes: a kill leaves rows past the checkpoint, maybe a half-written one."""
    from xlm_core.train.sinks import truncate_live as _truncate_live

    train = tmp_path / "plots" / "metrics" / "train"
    train.mkdir(parents=True)
    (train / "loss.tsv").write_text("timestamp\tstep\tloss\n1\t5\t4.5\n2\t10\t4.1\n3\t15\t3.9\n4\t20\t3.")
    (train / "lr.tsv").write_text("timestamp\tstep\tlr\n1\t5\t0.001\n2\t10\t0.002\n")
    (train / "mfu.tsv").write_text("times")                      # killed while writing the header
    _truncate_live(tmp_path, 10)
    assert (train / "loss.tsv").read_text() == "timestamp\tstep\tloss\n1\t5\t4.5\n2\t10\t4.1\n"
    assert (train / "lr.tsv").read_text() == "timestamp\tstep\tlr\n1\t5\t0.001\n2\t10\t0.002\n"
    assert not (train / "mfu.tsv").exists()
    assert sorted(p.name for p in train.iterdir()) == ["loss.tsv", "lr.tsv"]   # no temporary left


def test_three_trials_over_every_stage_through_the_script(tmp_path):
    proc = run([sys.executable, str(ROOT / "bench" / "fault_trials.py"), "--trials", "3", "--seed", "11",
                "--steps", "20", "--workdir", str(tmp_path)], ROOT, check=False, env=project_env(), timeout=1800)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert proc.stdout.count(": match") == 3, proc.stdout
    assert "3 trials, 0 mismatches, 0 corrupt outputs recorded in dvc.lock" in proc.stdout
