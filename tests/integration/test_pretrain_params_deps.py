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
