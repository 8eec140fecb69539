"""evaluate and export refuse a damaged model folder, or one holding another run's tokenizer, in one line (exit 2),
before writing anything: xlm_core.model_dir checks every file against the sizes and hashes pretrain recorded."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from tests.helpers.project import python_module, run
from tests.helpers.model_runs import build_run, set_section

from pipeline.params import load_params
from pipeline.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("refusals")
    params_path = build_run(root)
    set_section(params_path, "evaluate", retrieval=[], classification=[])
    return root, params_path


def damaged_weights(root: Path, folder: Path) -> str:
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 100] = bytes(b ^ 0xFF for b in data[middle:middle + 100])
    weights.write_bytes(bytes(data))
    return f"{weights}: its bytes differ"


def another_runs_tokenizer(root: Path, folder: Path) -> str:
    other = root / "other-tokenizer"
    if not other.is_dir():
        params_path = root / "other-params.yaml"
        shutil.copy(root / "params.yaml", params_path)
        set_section(params_path, "tokenizer", vocab_size=130)
        train_tokenizer(load_params("tokenizer", params_path), root / "clean", other, root / "other-tok.json")
    for name in ("tokenizer.json", "spm.model"):
        shutil.copy(other / name, folder / name)
    return f"{folder / 'spm.model'}: its bytes differ"


def one_error_line(proc, stage: str) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith(f"error: [{stage}] ") and "Traceback" not in proc.stderr
    return lines[-1]


@pytest.mark.parametrize("damage", [damaged_weights, another_runs_tokenizer], ids=["weights", "tokenizer"])
def test_evaluate_and_export_refuse_the_folder_and_write_nothing(tiny_run, tmp_path, damage):
    root, params_path = tiny_run
    folder = tmp_path / "model"
    shutil.copytree(root / "model", folder)
    fragment = damage(root, folder)

    out = tmp_path / "out"
    out.mkdir()
    (out / "eval.json").write_text('{"previous": 1}\n')
    proc = run(python_module("pipeline.evaluate", "--params", str(params_path), "--model", str(folder),
                             "--shards", str(root / "shards"), "--metrics", str(out / "eval.json"),
                             "--report", str(out / "eval.md"), "--plots", str(out / "plots")), cwd=tmp_path,
               check=False)
    line = one_error_line(proc, "evaluate")
    assert fragment in line and "dvc repro pretrain" in line
    assert sorted(p.name for p in out.iterdir()) == ["eval.json"]
    assert (out / "eval.json").read_text() == '{"previous": 1}\n'

    export_dir = tmp_path / "export" / "hf"
    proc = run(python_module("pipeline.export", "--params", str(params_path), "--model", str(folder),
                             "--out", str(export_dir)), cwd=tmp_path, check=False)
    line = one_error_line(proc, "export")
    assert fragment in line and "dvc repro pretrain" in line
    assert not export_dir.parent.exists() or not any(export_dir.parent.iterdir())
