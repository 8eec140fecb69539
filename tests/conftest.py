"""Fixtures every test folder shares: a real git + DVC project in a temporary folder, a real Prefect server."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.helpers.project import ROOT, new_git_dvc_repo


@pytest.fixture
def dvc_project(tmp_path: Path):
    """A fresh git repo with DVC initialised and this project's dvc.yaml and params.yaml copied in.

    The test edits params.yaml (``write_params``) to point at fixture files it writes; `dvc` runs the stages with
    this checkout's code through PYTHONPATH, exactly as `dvc repro` runs them for a user.
    """
    proj = new_git_dvc_repo(tmp_path / "proj")
    shutil.copy(ROOT / "dvc.yaml", proj / "dvc.yaml")
    shutil.copy(ROOT / "params.yaml", proj / "params.yaml")
    # dvc.yaml deps name the project's scripts; link the code in so DVC can hash them.
    for pkg in ("pipeline", "xlm_core"):
        shutil.copytree(ROOT / pkg, proj / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (proj / ".gitignore").write_text("/data/\n__pycache__/\n/dvclive/\n")
    return proj


@pytest.fixture(scope="module")
def prefect_api():
    """A real temporary Prefect server (a subprocess on 127.0.0.1 with its own database); yields its API URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()
