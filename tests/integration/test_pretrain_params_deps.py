"""The pretrain stage's DVC params are the keys that change the model: a logging or cadence edit reruns nothing.

Real DVC in a temporary git repo on the fixture corpus: after `dvc repro pretrain`, editing pretrain.log_every (or
another of pretrain_settings.RUNTIME_KEYS) leaves the stage up to date, editing pretrain.optimizer.lr does not.
"""
from __future__ import annotations

import json

import yaml

from tests.helpers import fault_trials
from tests.helpers.project import ROOT, dvc, set_dotted
from pipeline.params import PretrainParams
from pipeline.pretrain_settings import RUNTIME_KEYS


def _pretrain_changed(proj) -> bool:
    return "pretrain" in json.loads(dvc(proj, "status", "--json", "pretrain").stdout or "{}")


def _edit(proj, key: str, value) -> None:
    params = yaml.safe_load((proj / "params.yaml").read_text(encoding="utf-8"))
    set_dotted(params["pretrain"], key, value)
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True), encoding="utf-8")


def test_dvc_lists_every_pretrain_key_but_the_runtime_ones():
    listed = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["pretrain"]["params"]
    expected = {f"pretrain.{key}" for key in PretrainParams.model_fields if key not in RUNTIME_KEYS}
    assert set(listed) == expected | {"languages", "pairs"}


def test_a_log_every_edit_reruns_nothing_and_an_lr_edit_reruns_pretrain(tmp_path):
    proj = fault_trials.make_project(tmp_path / "proj", steps=4)
    dvc(proj, "repro", "pretrain")
    assert not _pretrain_changed(proj)

    for key, value in (("log_every", 3), ("eval_every", 2), ("checkpoint_every", 2), ("threads", 1)):
        _edit(proj, key, value)
    assert not _pretrain_changed(proj)
    assert "Running stage 'pretrain'" not in dvc(proj, "repro", "pretrain").stdout

    _edit(proj, "optimizer.lr", 0.003)
    assert _pretrain_changed(proj)


def test_a_settings_error_stops_dvc_repro_before_any_output_is_removed(tmp_path):
    """A typo in the pretrain section: the params stage refuses it first, so DVC never reaches pretrain and removes
    neither data/model nor metrics/pretrain.json (DVC deletes a stage's outputs just before running it)."""
    proj = fault_trials.make_project(tmp_path / "proj", steps=4)
    dvc(proj, "repro", "pretrain")
    before = fault_trials.snapshot(proj)
    model_before = {p.name: p.read_bytes() for p in (proj / "data" / "model").iterdir()}
    metrics_before = (proj / "metrics" / "pretrain.json").read_bytes()

    _edit(proj, "optimizer.lrr", 0.003)
    failed = dvc(proj, "repro", "pretrain", check=False)
    errors = [line for line in failed.stderr.splitlines() if line.startswith("error: [")]
    assert failed.returncode != 0 and len(errors) == 1, failed.stderr[-3000:]
    assert errors[0].startswith("error: [params] params.yaml: unknown key 'pretrain.optimizer.lrr'"), errors
    assert "Running stage 'pretrain'" not in failed.stdout and "Traceback" not in failed.stderr
    assert {p.name: p.read_bytes() for p in (proj / "data" / "model").iterdir()} == model_before
    assert (proj / "metrics" / "pretrain.json").read_bytes() == metrics_before
    assert fault_trials.differences(before, fault_trials.snapshot(proj)) == []

    _edit(proj, "optimizer", {k: v for k, v in _read(proj)["pretrain"]["optimizer"].items() if k != "lrr"})
    fixed = dvc(proj, "repro", "pretrain")
    ran = {line.split("'")[1] for line in fixed.stdout.splitlines() if line.startswith("Running stage '")}
    assert ran == set()                         # the failed check recorded nothing: back to the committed values
    assert fault_trials.differences(before, fault_trials.snapshot(proj)) == []

    # An input error only the stage can find (valid settings, a missing word-vectors file): DVC has removed
    # data/model by then, and the line says how to get it back.
    _edit(proj, "embeddings.vectors", "no-such.vec")
    failed = dvc(proj, "repro", "pretrain", check=False)
    errors = [line for line in failed.stderr.splitlines() if line.startswith("error: [")]
    assert failed.returncode != 0 and len(errors) == 1 and errors[0].startswith("error: [pretrain]"), failed.stderr
    assert "DVC removed the previous data/model before running the stage: `dvc checkout data/model` restores it" \
        in errors[0], errors
    assert not (proj / "data" / "model").exists()
    dvc(proj, "checkout", "data/model")
    assert {p.name: p.read_bytes() for p in (proj / "data" / "model").iterdir()} == model_before


def _read(proj) -> dict:
    return yaml.safe_load((proj / "params.yaml").read_text(encoding="utf-8"))
