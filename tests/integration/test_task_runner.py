"""Issue 14, acceptance 6: where a stage's units run is `<stage>.task_runner` in params.yaml, never whether some
Prefect server happens to answer.

Real `dvc repro` of the clean stage in a temporary DVC project, with a real Prefect server (a subprocess on
127.0.0.1, the same harness tests/integration/test_flow.py uses) that the project's prefect.toml points at, as `prefect server
start` on 127.0.0.1:4200 would be for a user. With task_runner thread, the run while that server listens writes the
bytes and the "units run on ..." lines of the run where nothing listens, and the server hears nothing. With
task_runner prefect, the units are task runs of flow xlm-clean on that server.
"""
from __future__ import annotations

import shutil
import socket
import sys
import time
from pathlib import Path

import pytest
import yaml
from tests.helpers.project import project_env, run
from tests.helpers.corpora import bible, write_clean_stage_params, write_source

DVC_YAML = {"stages": {"clean": {
    "cmd": "python -m pipeline.clean --raw raw",
    "deps": ["raw"],
    "params": ["languages", "pairs", "clean"],
    "outs": ["data/clean"],
    "metrics": [{"metrics/clean.json": {"cache": False}}],
}}}
CLEAN_UNITS = sorted([f"clean_file bible/{lang}" for lang in ("en", "fr", "ru")]
                     + [f"dedup_language {lang}" for lang in ("en", "fr", "ru")]
                     + [f"join bible {pair}" for pair in ("en-fr", "en-ru")])




@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A git + DVC project with one stage, clean, over a small parallel corpus; never run."""
    proj = tmp_path_factory.mktemp("runner") / "template"
    proj.mkdir()
    run(["git", "init", "-q"], proj)
    run([sys.executable, "-m", "dvc", "init", "-q"], proj)
    run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], proj)
    write_source(proj / "raw", "bible", bible(120), parallel=True)
    write_clean_stage_params(proj / "params.yaml", ["en", "fr", "ru"], ["en-fr", "en-ru"], task_runner="thread")
    (proj / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML, sort_keys=False))
    return proj


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def dvc_repro(template: Path, dest: Path, api_url: str, task_runner: str = "thread") -> tuple[Path, str]:
    """A copy of the project whose prefect.toml names ``api_url``, after `dvc repro`; (project, its output)."""
    proj = Path(shutil.copytree(template, dest, symlinks=True))
    (proj / "prefect.toml").write_text(f'[api]\nurl = "{api_url}"\n')     # what `prefect server start` users have
    if task_runner != "thread":
        params = yaml.safe_load((proj / "params.yaml").read_text())
        params["clean"]["task_runner"] = task_runner
        (proj / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True))
    env = project_env()
    env.pop("PREFECT_API_URL", None)                  # prefect.toml decides, as for a user with no such variable
    proc = run([sys.executable, "-m", "dvc", "repro"], proj, env=env, timeout=600)
    return proj, proc.stdout + proc.stderr


def outputs(proj: Path) -> dict[str, bytes]:
    files = sorted(p for p in (proj / "data" / "clean").rglob("*") if p.is_file())
    return {**{p.relative_to(proj).as_posix(): p.read_bytes() for p in files},
            "metrics/clean.json": (proj / "metrics" / "clean.json").read_bytes()}


def how_units_ran(output: str) -> list[str]:
    return [line.strip() for line in output.splitlines() if "units run" in line]


def clean_flow_runs() -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["xlm-clean"])))


def completed_task_runs(flow_run_id, expected: int) -> list[str]:
    """Names of the flow run's completed task runs, once ``expected`` are recorded (Prefect 3 records task-run
    states from events, a moment after they happen)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + 30
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            done = sorted(r.name for r in runs if r.state is not None and r.state.is_completed())
            if len(done) >= expected or time.monotonic() > deadline:
                return done
            time.sleep(0.5)


def test_a_listening_prefect_api_changes_nothing_with_the_thread_runner(template, prefect_api, tmp_path):
    quiet, quiet_output = dvc_repro(template, tmp_path / "no-server", f"http://127.0.0.1:{free_port()}/api")
    listening, listening_output = dvc_repro(template, tmp_path / "server-listening", prefect_api)

    assert outputs(listening) == outputs(quiet)
    assert (listening / "dvc.lock").read_bytes() == (quiet / "dvc.lock").read_bytes()
    lines = how_units_ran(quiet_output)
    assert len(lines) == 1 and lines[0].startswith("clean: units run on "), quiet_output   # a thread pool, or this
    assert how_units_ran(listening_output) == lines                                          # thread on one core
    for output in (quiet_output, listening_output):
        assert "prefect" not in output.lower() and "Traceback" not in output, output
    assert clean_flow_runs() == []                    # the server never heard of the stage


def test_the_prefect_runner_runs_the_units_as_prefect_tasks(template, prefect_api, tmp_path):
    reference, _ = dvc_repro(template, tmp_path / "thread", f"http://127.0.0.1:{free_port()}/api")
    proj, output = dvc_repro(template, tmp_path / "prefect", prefect_api, task_runner="prefect")

    assert outputs(proj) == outputs(reference)
    assert how_units_ran(output) == [f"clean: units run as Prefect tasks of flow xlm-clean, reporting to the Prefect "
                                     f"server at {prefect_api} (UI: {prefect_api.removesuffix('/api')})"]
    flow_run, = clean_flow_runs()
    assert flow_run.state.is_completed(), flow_run.state
    assert completed_task_runs(flow_run.id, len(CLEAN_UNITS)) == CLEAN_UNITS
