"""Faults of the training half of the pipeline, through the stage CLIs on a tiny real run.

NaN loss, word vectors holding NaN, a shard damaged after the shard stage, a full disk while writing shards or a
checkpoint, a model folder whose tokenizer is not the model's, an export killed half-way, and a Prefect server that
does not answer (which `dvc repro` never needs).
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers.project import ROOT, project_env, run, write_params
from tests.helpers.faults import (assert_one_error_line, build_corpus, leftovers, pretrain_args, run_module, tree_digest,
                           write_pretrain_params)
from xlm_core.train import checkpoint as ckpt


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(corpus, run): shards of the fixture corpus and a finished 10-step run (checkpoints 5 and 10, data/model)."""
    corpus = build_corpus(tmp_path_factory.mktemp("stage-faults"))
    run_dir = corpus / "run"
    write_pretrain_params(run_dir / "params.yaml", corpus / "params.yaml")
    proc = run_module("pipeline.pretrain", *pretrain_args(run_dir, corpus))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return corpus, run_dir


def file_bytes(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir())}


def previous_outputs(run_dir: Path) -> dict[str, str]:
    """Fake outputs of an earlier run that a failing run must leave exactly as they are."""
    (run_dir / "model").mkdir(parents=True)
    (run_dir / "model" / "model.safetensors").write_bytes(b"the previous model")
    (run_dir / "metrics.json").write_text('{"previous": true}\n')
    return tree_digest(run_dir / "model", run_dir / "metrics.json")


# ---------------------------------------------------------------------------------------------------------- pretrain
def test_nan_loss_stops_after_max_bad_steps_with_one_line(trained, tmp_path):
    corpus, _ = trained
    run_dir = tmp_path / "nan"
    # eps 1e-300 is 0 in float32: Adam divides 0 by 0 for every row without gradient, and the next loss is NaN.
    write_pretrain_params(run_dir / "params.yaml", corpus / "params.yaml", max_bad_steps=3,
                          **{"optimizer.eps": 1e-300})
    before = previous_outputs(run_dir)
    proc = run_module("pipeline.pretrain", *pretrain_args(run_dir, corpus))
    assert_one_error_line(proc, "pretrain", "loss was not finite for 3 steps in a row", "last at step",
                          "lower pretrain.optimizer.lr")
    assert tree_digest(run_dir / "model", run_dir / "metrics.json") == before
    assert ckpt.list_checkpoints(run_dir / "checkpoints") == []  # no step was good enough to checkpoint


def test_word_vectors_with_nan_are_refused_before_training(trained, tmp_path):
    corpus, _ = trained
    from xlm_core.tokenizer import Tokenizer

    tok = Tokenizer.load(corpus / "tokenizer")
    words = sorted({tok.id_to_piece(i).lstrip("\u2581") for i in range(4, tok.vocab_size - 1)} - {""})
    vec = tmp_path / "en.vec"
    vec.write_text(f"{len(words)} 4\n" + "".join(f"{w} nan 0.1 0.2 0.3\n" for w in words), encoding="utf-8")
    run_dir = tmp_path / "vec"
    write_pretrain_params(run_dir / "params.yaml", corpus / "params.yaml", **{"embeddings.vectors": str(vec)})
    before = previous_outputs(run_dir)
    proc = run_module("pipeline.pretrain", *pretrain_args(run_dir, corpus))
    assert_one_error_line(proc, "pretrain", "pretrain.embeddings.vectors", str(vec), "NaN or infinite",
                          "fix or replace")
    assert "step 1/" not in proc.stderr
    assert tree_digest(run_dir / "model", run_dir / "metrics.json") == before


@pytest.mark.parametrize("split", ["train", "valid"])
def test_shard_damaged_after_sharding_is_named_by_pretrain(trained, tmp_path, split):
    corpus, _ = trained
    shards = tmp_path / "shards"
    shutil.copytree(corpus / "shards", shards)
    victim = shards / split / "mono-00000.parquet"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    run_dir = tmp_path / "run"
    write_pretrain_params(run_dir / "params.yaml", corpus / "params.yaml")
    before = previous_outputs(run_dir)
    args = pretrain_args(run_dir, corpus)
    args[args.index("--shards") + 1] = str(shards)
    proc = run_module("pipeline.pretrain", *args)
    assert_one_error_line(proc, "pretrain", f"{split}/mono-00000.parquet: checksum mismatch", "damaged",
                          "dvc repro shard")
    assert tree_digest(run_dir / "model", run_dir / "metrics.json") == before


# ------------------------------------------------------------------------------------------------------- disk full
# The full disk is RLIMIT_FSIZE in the stage's process (files cannot grow past a limit; SIGXFSZ ignored, so the write
# fails with EFBIG as it would with ENOSPC): no privileges or tmpfs needed.
def test_disk_full_while_writing_shards_keeps_the_previous_shards(trained, tmp_path):
    corpus, _ = trained
    shards = tmp_path / "shards"
    shutil.copytree(corpus / "shards", shards)
    (tmp_path / "shard.json").write_bytes((corpus / "shard.json").read_bytes())
    before = tree_digest(shards, tmp_path / "shard.json")
    smallest = min(p.stat().st_size for p in (corpus / "shards").rglob("*.parquet"))
    args = ["--params", str(corpus / "params.yaml"), "--clean-dir", str(corpus / "clean"),
            "--tokenizer-dir", str(corpus / "tokenizer"), "--out-dir", str(shards),
            "--metrics", str(tmp_path / "shard.json")]

    full = run_module("pipeline.shard", *args, limit_bytes=smallest // 2)
    assert_one_error_line(full, "shard", "disk full while writing", str(shards), "File too large",
                          "rerun `dvc repro shard`", "previous")
    assert tree_digest(shards, tmp_path / "shard.json") == before
    check = run_module("pipeline.shard", "--check", "--tokenizer-dir", str(corpus / "tokenizer"),
                       "--out-dir", str(shards))
    assert check.returncode == 0 and "ok:" in check.stderr   # every checksum still matches
    assert leftovers(tmp_path) == []

    again = run_module("pipeline.shard", *args)  # space freed: the rerun works and gives the same bytes
    assert again.returncode == 0, again.stderr[-2000:]
    assert tree_digest(shards, tmp_path / "shard.json") == before


def test_disk_full_while_writing_a_checkpoint_keeps_the_previous_one(trained, tmp_path):
    corpus, finished = trained
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    reference_model = (finished / "model" / "model.safetensors").read_bytes()
    assert [s for s, _ in ckpt.list_checkpoints(run_dir / "checkpoints")] == [5, 10]
    # As if killed after checkpoint 5: the newest checkpoint is step 5; the earlier run's outputs stay.
    shutil.rmtree(ckpt.checkpoint_dir(run_dir / "checkpoints", 10))
    outputs_before = tree_digest(run_dir / "model", run_dir / "metrics.json")
    step5 = ckpt.checkpoint_dir(run_dir / "checkpoints", 5)
    step5_before = tree_digest(step5)

    full = run_module("pipeline.pretrain", *pretrain_args(run_dir, corpus),
                      limit_bytes=(step5 / "model.safetensors").stat().st_size // 2)
    assert "resuming from step-000000005" in full.stderr
    assert_one_error_line(full, "pretrain", "disk full while writing checkpoint",
                          str(ckpt.checkpoint_dir(run_dir / "checkpoints", 10)), "File too large",
                          "free space", "resumes from step-000000005")
    assert [s for s, _ in ckpt.list_checkpoints(run_dir / "checkpoints")] == [5]
    assert tree_digest(step5) == step5_before
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(run_dir / "checkpoints")).step == 5
    assert tree_digest(run_dir / "model", run_dir / "metrics.json") == outputs_before
    assert leftovers(run_dir / "checkpoints") == [] and leftovers(run_dir / "model") == []

    again = run_module("pipeline.pretrain", *pretrain_args(run_dir, corpus))  # space freed: resume and finish
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming from step-000000005" in again.stderr
    assert (run_dir / "model" / "model.safetensors").read_bytes() == reference_model
    # the resumed run's checkpoint is the uninterrupted run's, byte for byte (optimizer state included)
    uninterrupted, resumed = (ckpt.checkpoint_dir(d / "checkpoints", 10) for d in (finished, run_dir))
    assert file_bytes(resumed) == file_bytes(uninterrupted)


# ---------------------------------------------------------------------------------------------- evaluate / export
def _evaluate_params(run_dir: Path, target: Path) -> Path:
    data = yaml.safe_load((run_dir / "params.yaml").read_text())
    data["evaluate"] = {**yaml.safe_load((ROOT / "params.yaml").read_text())["evaluate"],
                        "seq_len": 32, "batch_size": 8, "max_batches": 1, "max_retrieval_pairs": 20,
                        "device": "cpu", "threads": 1}
    data["export"] = yaml.safe_load((ROOT / "params.yaml").read_text())["export"]
    target.write_text(yaml.safe_dump(data, sort_keys=False))
    return target


def test_model_folder_whose_tokenizer_is_not_the_models_is_refused(trained, tmp_path):
    corpus, run_dir = trained
    from pipeline.params import load_params
    from pipeline.tokenizer import train_tokenizer
    from tests.helpers.corpora import write_tokenizer_shard_params

    other = tmp_path / "other"
    params_path = write_tokenizer_shard_params(tmp_path / "tok-params.yaml", ["en", "fr", "ru"],
                                               tokenizer={"vocab_size": 120})
    train_tokenizer(load_params("tokenizer", params_path), corpus / "clean", other, tmp_path / "tok.json")
    model = tmp_path / "model"
    shutil.copytree(run_dir / "model", model)
    for f in other.iterdir():               # a tokenizer of another vocabulary dropped into data/model
        shutil.copy(f, model / f.name)
    out = tmp_path / "out"
    out.mkdir()
    (out / "eval.json").write_text('{"previous": 1}\n')
    params = _evaluate_params(run_dir, tmp_path / "params.yaml")
    proc = run_module("pipeline.evaluate", "--params", str(params), "--model", str(model), "--shards",
                      str(corpus / "shards"), "--metrics",
                      str(out / "eval.json"), "--report", str(out / "eval.md"), "--plots", str(out / "plots"))
    assert_one_error_line(proc, "evaluate", str(model), "replaced by another run's file", "dvc repro pretrain")
    assert sorted(p.name for p in out.iterdir()) == ["eval.json"]
    assert (out / "eval.json").read_text() == '{"previous": 1}\n'


KILLED_MID_EXPORT = """
import os, runpy, signal, sys
import safetensors.torch

real_save_file = safetensors.torch.save_file

def save_then_die(*args, **kwargs):
    real_save_file(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)   # the weights are written; the other files and the rename are not

safetensors.torch.save_file = save_then_die
sys.argv = ["pipeline.export", *sys.argv[1:]]
runpy.run_module("pipeline.export", run_name="__main__")
"""


def test_export_killed_half_way_keeps_the_previous_folder_and_reruns(trained, tmp_path):
    corpus, run_dir = trained
    params = _evaluate_params(run_dir, tmp_path / "params.yaml")
    out = tmp_path / "export" / "hf"
    args = ["--params", str(params), "--model", str(run_dir / "model"), "--out", str(out)]
    first = run_module("pipeline.export", *args)
    assert first.returncode == 0, first.stderr[-2000:]
    complete = tree_digest(out)

    killed = run([sys.executable, "-c", KILLED_MID_EXPORT, *args], ROOT, check=False,
                 env=project_env({"OMP_NUM_THREADS": "1"}))
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert tree_digest(out) == complete            # the previous export, whole
    assert leftovers(out.parent), "the kill did not land inside the folder's write"

    again = run_module("pipeline.export", *args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert tree_digest(out) == complete and leftovers(out.parent) == []


# ------------------------------------------------------------------------------------------------------------ flow
def test_dvc_repro_does_not_need_the_prefect_server(dvc_project):
    """`xlm flow` says "no Prefect server answers at URL" (tests/integration/test_flow.py); plain `dvc repro` never asks."""
    proj = dvc_project
    (proj / "en.txt").write_text("".join(f"a sentence number {i}\n" for i in range(50)))

    def one_source(p):
        p.update(languages=["en"], pairs=[])
        p["download"]["sources"] = [{"name": "local", "kind": "local", "path": "en.txt", "languages": ["en"]}]

    write_params(proj, one_source)
    env = project_env({"PREFECT_API_URL": "http://127.0.0.1:9/api"})   # port 9 (discard): nothing answers
    proc = run([sys.executable, "-m", "dvc", "repro", "download"], proj, env=env, timeout=300)
    assert "Running stage 'download'" in proc.stdout
    assert json.loads((proj / "data" / "raw" / "local" / "manifest.json").read_text())["counts"] == {"en": 50}
    status = run([sys.executable, "-m", "dvc", "status", "--json", "download"], proj, env=env)
    assert json.loads(status.stdout or "{}") == {}
