"""What the tests share: this checkout's root, the environment and runner of subprocesses, DVC and params.yaml edits."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def project_env(extra: dict | None = None) -> dict:
    """Environment for subprocesses: this checkout importable, no telemetry, a git identity, no network analytics."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update({
        "DVC_NO_ANALYTICS": "1",
        "DO_NOT_TRACK": "1",
        "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
        "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "2"),
    })
    if extra:
        env.update(extra)
    return env


def run(cmd: list[str], cwd: Path, check: bool = True, env: dict | None = None, timeout: float = 900):
    """Run a command (argument list, never a shell string) and return the CompletedProcess with text output."""
    proc = subprocess.run(cmd, cwd=cwd, env=env or project_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def write_params(proj: Path, mutate) -> dict:
    """Load proj/params.yaml, let ``mutate(dict)`` edit it, write it back; returns the new dict."""
    path = proj / "params.yaml"
    data = yaml.safe_load(path.read_text())
    mutate(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return data


def dvc(proj: Path, *args: str, check: bool = True, timeout: float = 900):
    return run([sys.executable, "-m", "dvc", *args], proj, check=check, timeout=timeout)


def set_dotted(mapping: dict, key: str, value) -> None:
    """``mapping["a"]["b"] = value`` for ``key = "a.b"``, creating the sections on the way."""
    *parents, last = key.split(".")
    for part in parents:
        mapping = mapping.setdefault(part, {})
    mapping[last] = value


def new_git_dvc_repo(proj: Path) -> Path:
    """An empty git repository at ``proj`` with DVC initialised there (analytics off); returns ``proj``."""
    proj.mkdir(parents=True)
    run(["git", "init", "-q"], proj)
    dvc(proj, "init", "-q")
    dvc(proj, "config", "core.analytics", "false")
    return proj
