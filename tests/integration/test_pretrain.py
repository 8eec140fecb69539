"""The pretrain stage end to end on tiny real shards: exact resume after SIGKILL, DDP equivalence, bad input."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from tests.helpers import fault_trials
from tests.helpers.project import ROOT, project_env, python_module, run, set_dotted
from pipeline.params import load_params
from pipeline.shard import make_shards
from pipeline.tokenizer import train_tokenizer
from tests.helpers.corpora import write_clean, write_tokenizer_shard_params
from xlm_core.train.checkpoint import list_checkpoints

LANGS = ["en", "fr", "ru"]
PAIRS = ["en-fr", "en-ru"]
ROWS = {"en": 300, "fr": 300, "ru": 300}

PRETRAIN = {
    "model": {"preset": "tiny", "dropout": 0.1, "attention_dropout": 0.0},
    "seq_len": 32, "batch_size": 8, "accum_steps": 1, "mode": "stream",
    "seq_len_warmup": {"start": 8, "steps": 12},   # rows of 8, then 16, then 32 from step 12: resume crosses them
    "objectives": {"mlm": 1.0, "tlm": 0.5}, "alpha": 0.5,
    "adversarial": {"weight": 0.1, "lambda_max": 0.5, "warmup_steps": 5, "hidden": 32},
    "optimizer": {"lr": 0.002, "warmup_steps": 5, "schedule": "linear"},
    "steps": 24, "eval_every": 12, "eval_batches": 2, "checkpoint_every": 6, "keep_checkpoints": 2,
    "log_every": 3, "seed": 7, "threads": 1,
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """clean fixture -> real sentencepiece tokenizer -> real Parquet shards."""
    root = tmp_path_factory.mktemp("pretrain")
    params_path = write_tokenizer_shard_params(root / "params.yaml", LANGS, PAIRS, tokenizer={"vocab_size": 150})
    write_clean(root / "clean", ROWS, PAIRS)
    train_tokenizer(load_params("tokenizer", params_path), root / "clean", root / "tokenizer", root / "tok.json")
    make_shards(load_params("shard", params_path), root / "clean", root / "tokenizer", root / "shards",
                root / "shard.json")
    return root


def write_run_params(run_dir: Path, corpus: Path, **overrides) -> Path:
    data = yaml.safe_load((corpus / "params.yaml").read_text())
    pretrain = yaml.safe_load(yaml.safe_dump(PRETRAIN))
    for key, value in overrides.items():
        set_dotted(pretrain, key, value)
    data["pretrain"] = pretrain
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "params.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def pretrain_cmd(run_dir: Path, corpus: Path) -> list[str]:
    return python_module("pipeline.pretrain", "--params", str(run_dir / "params.yaml"),
                         "--shards", str(corpus / "shards"), "--tokenizer", str(corpus / "tokenizer"),
                         "--checkpoints", str(run_dir / "checkpoints"), "--out", str(run_dir / "model"),
                         "--metrics", str(run_dir / "metrics.json"), "--live", str(run_dir / "dvclive"))


def env1() -> dict:
    return project_env({"OMP_NUM_THREADS": "1"})


def test_trains_and_writes_model(corpus, tmp_path):
    run_dir = tmp_path / "a"
    write_run_params(run_dir, corpus)
    proc = run(pretrain_cmd(run_dir, corpus), ROOT, env=env1())
    assert "step 24/24" in proc.stderr
    weights = load_file(str(run_dir / "model" / "model.safetensors"))
    assert "tok_emb.weight" in weights and not any(k.startswith("discriminator") for k in weights)
    assert (run_dir / "model" / "spm.model").exists() and (run_dir / "model" / "config.json").exists()
    metrics = yaml.safe_load((run_dir / "metrics.json").read_text())
    assert set(metrics["valid"]) >= {f"mlm_loss/{lang}" for lang in LANGS}
    assert (run_dir / "dvclive" / "plots" / "metrics" / "train" / "loss.tsv").exists()
    row_lengths = (run_dir / "dvclive" / "plots" / "metrics" / "train" / "row_length.tsv").read_text().split("\n")
    assert [float(line.split("\t")[-1]) for line in row_lengths[1:] if line] == \
        [8.0, 8.0, 16.0, 16.0, 32.0, 32.0, 32.0, 32.0]                     # logged at steps 3, 6, ..., 24
    # a rerun with the same settings finds the final checkpoint and does not train again
    again = run(pretrain_cmd(run_dir, corpus), ROOT, env=env1())
    assert "resuming from step-000000024" in again.stderr and "step 1/24" not in again.stderr


def _wait_for_checkpoint(ckpt_dir: Path, proc: subprocess.Popen, min_step: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        done = [step for step, path in list_checkpoints(ckpt_dir) if (path / "COMMIT").exists()]
        if any(step >= min_step for step in done):
            return
        if proc.poll() is not None:
            raise AssertionError("training ended before the checkpoint to kill after")
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared in time")


def test_exact_resume_after_sigkill(corpus, tmp_path):
    reference = tmp_path / "reference"
    write_run_params(reference, corpus)
    run(pretrain_cmd(reference, corpus), ROOT, env=env1())

    killed = tmp_path / "killed"
    write_run_params(killed, corpus)
    proc = subprocess.Popen(pretrain_cmd(killed, corpus), cwd=ROOT, env=env1(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_checkpoint(killed / "checkpoints", proc, min_step=6)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "model").exists()
    resumed = run(pretrain_cmd(killed, corpus), ROOT, env=env1())
    assert "resuming from step-" in resumed.stderr
    assert (killed / "model" / "model.safetensors").read_bytes() == \
        (reference / "model" / "model.safetensors").read_bytes()


def test_half_written_checkpoint_is_ignored(corpus, tmp_path):
    reference = tmp_path / "reference"
    write_run_params(reference, corpus, steps=12)
    run(pretrain_cmd(reference, corpus), ROOT, env=env1())

    damaged = tmp_path / "damaged"
    write_run_params(damaged, corpus, steps=12)
    proc = subprocess.Popen(pretrain_cmd(damaged, corpus), cwd=ROOT, env=env1(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_checkpoint(damaged / "checkpoints", proc, min_step=6)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # what a kill during the write leaves: a newer checkpoint whose files do not match its COMMIT marker,
    # and a temporary folder of the atomic rename
    newest = list_checkpoints(damaged / "checkpoints")[-1][1]
    fake = damaged / "checkpoints" / "step-000000011"
    fake.mkdir()
    for f in newest.iterdir():
        (fake / f.name).write_bytes(f.read_bytes())
    weights = fake / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (damaged / "checkpoints" / f"step-000000012.tmp-{os.getpid()}-dead").mkdir()
    resumed = run(pretrain_cmd(damaged, corpus), ROOT, env=env1())
    assert "ignoring incomplete checkpoint" in resumed.stderr and "step-000000011" in resumed.stderr
    assert (damaged / "model" / "model.safetensors").read_bytes() == \
        (reference / "model" / "model.safetensors").read_bytes()


def test_changed_settings_start_fresh(corpus, tmp_path):
    run_dir = tmp_path / "r"
    write_run_params(run_dir, corpus, steps=6)
    run(pretrain_cmd(run_dir, corpus), ROOT, env=env1())
    write_run_params(run_dir, corpus, steps=6, **{"optimizer.lr": 0.001})
    again = run(pretrain_cmd(run_dir, corpus), ROOT, env=env1())
    assert "settings changed since checkpoint step-000000006 (pretrain.optimizer.lr): starting fresh" in again.stderr
    # runtime-only keys (logging cadence) do not invalidate the checkpoint
    write_run_params(run_dir, corpus, steps=6, log_every=2, **{"optimizer.lr": 0.001})
    third = run(pretrain_cmd(run_dir, corpus), ROOT, env=env1())
    assert "resuming from step-000000006" in third.stderr


def test_a_failed_start_under_new_settings_keeps_the_old_checkpoints(corpus, tmp_path):
    run_dir = tmp_path / "r"
    write_run_params(run_dir, corpus, steps=6)
    run(pretrain_cmd(run_dir, corpus), ROOT, env=env1())
    checkpoints = run_dir / "checkpoints"
    before = {str(p.relative_to(checkpoints)): p.read_bytes() for p in sorted(checkpoints.rglob("*")) if p.is_file()}
    assert any("step-000000006" in name for name in before)
    # new settings whose input fails only after the checkpoints were looked at: a missing word-vectors file
    write_run_params(run_dir, corpus, steps=6, **{"optimizer.lr": 0.001, "embeddings.vectors": str(tmp_path / "no.vec")})
    failed = run(pretrain_cmd(run_dir, corpus), ROOT, env=env1(), check=False)
    assert failed.returncode == 2 and "Traceback" not in failed.stderr
    after = {str(p.relative_to(checkpoints)): p.read_bytes() for p in sorted(checkpoints.rglob("*")) if p.is_file()}
    assert after == before


def test_ddp_two_ranks_equal_one_rank_with_accumulation(corpus, tmp_path):
    common = {"steps": 6, "checkpoint_every": 6, "eval_every": 100, "model.dropout": 0.1,
              "adversarial.weight": 0.0}
    single = tmp_path / "single"
    write_run_params(single, corpus, accum_steps=2, nproc=1, **common)
    run(pretrain_cmd(single, corpus), ROOT, env=env1())

    ddp = tmp_path / "ddp"   # nproc 2: `python -m pipeline.pretrain` starts two workers with torchrun's launcher
    write_run_params(ddp, corpus, accum_steps=1, nproc=2, **common)
    launched = run(pretrain_cmd(ddp, corpus), ROOT, env=env1())
    assert "pretrain: 2 process(es) on cpu, DDP" in launched.stderr, launched.stderr[-3000:]
    a = load_file(str(single / "model" / "model.safetensors"))
    b = load_file(str(ddp / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= 1e-5, worst
    # and training did move the weights (the comparison is not between two untouched inits)
    init = tmp_path / "init"
    write_run_params(init, corpus, **{**common, "steps": 1, "optimizer.lr": 1e-9})
    run(pretrain_cmd(init, corpus), ROOT, env=env1())
    c = load_file(str(init / "model" / "model.safetensors"))
    assert max(float((a[k] - c[k]).abs().max()) for k in a) > 1e-3


def test_word_vectors_initialise_embeddings(corpus, tmp_path):
    from xlm_core.tokenizer import Tokenizer

    tok = Tokenizer.load(corpus / "tokenizer")
    words = [tok.id_to_piece(i).lstrip("\u2581") for i in range(4, tok.vocab_size - 1)]
    words = [w for w in words if w][:20]
    vec = tmp_path / "en.vec"
    vec.write_text(f"{len(words)} 8\n" + "".join(f"{w} " + " ".join(["0.5"] * 8) + "\n" for w in words))
    run_dir = tmp_path / "vec"
    write_run_params(run_dir, corpus, steps=1, **{"embeddings.vectors": {"en": str(vec)},
                                                  "optimizer.lr": 1e-9})
    proc = run(pretrain_cmd(run_dir, corpus), ROOT, env=env1())
    assert "embeddings: initialised" in proc.stderr and "coverage" in proc.stderr


def test_a_user_error_in_two_workers_is_one_line_not_torchruns_report(corpus, tmp_path):
    run_dir = tmp_path / "bad"
    # a missing word-vectors file: found by the workers (the settings are valid), not by the launcher
    write_run_params(run_dir, corpus, nproc=2, **{"embeddings.vectors": str(tmp_path / "no.vec")})
    proc = run(pretrain_cmd(run_dir, corpus), ROOT, env=env1(), check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "no.vec" in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr, proc.stderr[-3000:]
    assert not (run_dir / "model").exists()


def test_a_worker_killed_by_the_os_is_one_line_from_the_launcher(corpus, tmp_path):
    """An OOM kill of one worker prints nothing itself: the launcher names the rank and the signal, in one line."""
    run_dir = tmp_path / "oom"
    write_run_params(run_dir, corpus, nproc=2, steps=2000, checkpoint_every=5)
    proc = subprocess.Popen(pretrain_cmd(run_dir, corpus), cwd=ROOT, env=env1(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    _wait_for_checkpoint(run_dir / "checkpoints", proc, min_step=5)
    workers = fault_trials.descendants(proc.pid)
    assert len(workers) == 2, workers
    os.kill(workers[-1], signal.SIGKILL)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "was killed by SIGKILL" in errors[0] and "dvc repro" in errors[0], stderr[-3000:]
    assert errors[0].startswith("error: [pretrain] worker rank "), errors
    assert "Traceback" not in stderr and "ChildFailedError" not in stderr, stderr[-3000:]


@pytest.mark.parametrize("change, message", [
    ({"seq_len": 4096}, "pretrain.seq_len = 4096: exceeds the model's max_positions"),
    ({"nproc": 4096}, "pretrain.nproc = 4096 exceeds the"),
    ({"model.d_model": 65}, "pretrain.model"),
])
def test_bad_settings_fail_with_one_line(corpus, tmp_path, change, message):
    run_dir = tmp_path / "bad"
    write_run_params(run_dir, corpus, **change)
    proc = run(pretrain_cmd(run_dir, corpus), ROOT, env=env1(), check=False)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_shards_and_foreign_tokenizer(corpus, tmp_path):
    run_dir = tmp_path / "x"
    write_run_params(run_dir, corpus)
    cmd = pretrain_cmd(run_dir, corpus)
    missing = [*cmd[:cmd.index("--shards") + 1], str(tmp_path / "nowhere"), *cmd[cmd.index("--shards") + 2:]]
    proc = run(missing, ROOT, env=env1(), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "dvc repro" in proc.stderr.splitlines()[-1]

    # a tokenizer from another run (other vocabulary size) than the shards
    other = tmp_path / "other"
    other.mkdir()
    params_path = write_tokenizer_shard_params(other / "params.yaml", LANGS, PAIRS, tokenizer={"vocab_size": 120})
    train_tokenizer(load_params("tokenizer", params_path), corpus / "clean", other / "tokenizer", other / "t.json")
    foreign = [*cmd[:cmd.index("--tokenizer") + 1], str(other / "tokenizer"), *cmd[cmd.index("--tokenizer") + 2:]]
    proc = run(foreign, ROOT, env=env1(), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "tokenizer" in proc.stderr.splitlines()[-1]
