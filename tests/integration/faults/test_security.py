"""Security rules, checked on the source tree (by its syntax tree, not by regexes over text) and on real files.

- model weights leave a process only as safetensors; ``torch.save`` only writes checkpoint state (optimizer,
  scheduler, counters), and every ``torch.load`` passes ``weights_only=True``, so a planted pickle cannot run code;
- no pickle-family module (pickle, cPickle, dill, cloudpickle, joblib, shelve, marshal) in pipeline/ or xlm_core/,
  no ``np.load(allow_pickle=True)``, ``pd.read_pickle``, unsafe ``yaml.load``, ``eval``/``exec``;
- subprocesses get argument lists: never ``shell=True``, ``os.system`` or ``os.popen``, anywhere in the repository;
- archives are never extracted by member name (no ``extractall``/``extract``): members are read as streams after
  every name was checked (see tests/integration/test_download.py and test_download_faults.py for the refusals themselves).
"""
from __future__ import annotations

import ast
import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from tests.helpers.project import ROOT
from xlm_core.train import checkpoint as ckpt
from xlm_core.atomic import sha256_file

LIBRARY = ("pipeline", "xlm_core")
EVERYWHERE = ("pipeline", "xlm_core", "bench", "tests")
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def python_files(*folders: str) -> list[Path]:
    files = [p for folder in folders for p in sorted((ROOT / folder).rglob("*.py"))]
    assert len(files) > 10, files   # the walk found the tree
    return files


def calls(path: Path):
    """(dotted name of the called function, the Call node) for every call in ``path``."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Call):
            yield _dotted(node.func), node


def _dotted(func: ast.expr) -> str:
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    parts.append(func.id if isinstance(func, ast.Name) else "<expr>")   # model.to(device).eval() is no eval()
    return ".".join(reversed(parts))


def _where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(ROOT)}:{node.lineno}"


def _keyword(node: ast.Call, name: str):
    return next((kw.value for kw in node.keywords if kw.arg == name), None)


def test_torch_save_writes_only_checkpoint_state():
    found = [(p, node) for p in python_files(*LIBRARY, "bench") for name, node in calls(p) if name == "torch.save"]
    assert found, "torch.save is used to write checkpoint state; the search found nothing"
    for path, node in found:
        assert path == ROOT / "xlm_core" / "train" / "checkpoint.py", f"torch.save at {_where(path, node)}: use safetensors"
        saved = node.args[0]
        if isinstance(saved, ast.Call) and _dotted(saved.func) == "_canonical":   # a copy, for byte-stable files
            saved = saved.args[0]
        assert isinstance(saved, ast.Name) and saved.id == "state", _where(path, node)


def test_every_torch_load_is_weights_only():
    found = [(p, node) for p in python_files(*EVERYWHERE) for name, node in calls(p) if name == "torch.load"]
    assert found
    for path, node in found:
        flag = _keyword(node, "weights_only")
        assert isinstance(flag, ast.Constant) and flag.value is True, \
            f"torch.load at {_where(path, node)} without weights_only=True"


def test_no_pickle_in_the_library():
    for path in python_files(*LIBRARY):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                names = {(node.module or "").split(".")[0]}
            else:
                continue
            assert not names & PICKLE_MODULES, f"{_where(path, node)} imports {names & PICKLE_MODULES}"
        for name, node in calls(path):
            where = _where(path, node)
            assert name.rsplit(".", 1)[-1] not in {"read_pickle", "to_pickle"}, where
            assert name not in {"eval", "exec", "yaml.load", "yaml.unsafe_load", "yaml.full_load"}, where
            allow = _keyword(node, "allow_pickle")
            assert not (isinstance(allow, ast.Constant) and allow.value), f"allow_pickle=True at {where}"


def test_subprocesses_get_argument_lists_never_a_shell():
    for path in python_files(*EVERYWHERE):
        for name, node in calls(path):
            where = _where(path, node)
            shell = _keyword(node, "shell")
            assert not (isinstance(shell, ast.Constant) and shell.value), f"shell=True at {where}"
            assert name not in {"os.system", "os.popen", "subprocess.getoutput", "subprocess.getstatusoutput"}, where


def test_archives_are_never_extracted_by_member_name():
    for path in python_files(*LIBRARY):
        for name, node in calls(path):
            assert name.rsplit(".", 1)[-1] not in {"extractall", "extract"}, \
                f"{_where(path, node)}: read members as streams after checking their names"


class _RunsCode:
    """Unpickling this would run a shell command: what a planted checkpoint would carry."""

    def __reduce__(self):
        return (os.system, ("touch planted-pickle-ran",))


def test_a_planted_pickle_in_a_checkpoint_is_refused_not_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "checkpoints" / "step-000000005"
    folder.mkdir(parents=True)
    from safetensors.torch import save_file

    save_file({"model.w": torch.zeros(2)}, str(folder / "model.safetensors"))
    with open(folder / "state.pt", "wb") as fh:
        torch.save({"optimizer": _RunsCode()}, fh, pickle_module=pickle)
    (folder / "meta.json").write_text('{"step": 5}\n')
    (folder / ckpt.COMMIT).write_text(json.dumps({name: {"bytes": (folder / name).stat().st_size,
                                                         "sha256": sha256_file(folder / name)}
                                                  for name in ckpt.FILES}))
    assert ckpt.latest_checkpoint(tmp_path / "checkpoints") == folder   # it looks complete...
    with pytest.raises(ckpt.CheckpointError, match="cannot be read"):
        ckpt.load_checkpoint(folder)                                    # ...but is refused
    assert not (tmp_path / "planted-pickle-ran").exists()
