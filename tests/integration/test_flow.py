"""`xlm flow`: the Prefect 3 flow over the DVC DAG, against a real temporary Prefect server and real DVC.

The flow is tested on a tiny fixture pipeline of its own (four quick stages written by `stage.py` below), not on the
ML stages: what is under test is how DVC's stages become Prefect task runs, states, logs and artifacts.
"""
from __future__ import annotations

import base64
import json
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
    LogFilterTaskRunId,
)
from prefect.client.schemas.sorting import FlowRunSort, LogSort
from prefect.logging.handlers import APILogHandler

from pipeline import flow as xlm_flow
from pipeline.errors import PipelineError
from tests.helpers.project import ROOT, dvc, new_git_dvc_repo, project_env, run, write_params

# ---------------------------------------------------------------------------------------------- the fixture pipeline
STAGE_SCRIPT = textwrap.dedent('''
    """Fixture stages: read params.yaml, write outputs, print the way the real stages do."""
    import json, os, sys, time
    from pathlib import Path

    import yaml
    from tqdm import tqdm


    PNG = ("89504e470d0a1a0a0000000d49484452000000010000000108000000003a7e9b550000000a49444154789c6368000000"
           "82008177cd72b60000000049454e44ae426082")                # a grey 1x1 PNG
    LANGS = ("en", "fr", "ru", "de", "es")


    def main(name):
        p = yaml.safe_load(Path("params.yaml").read_text())[name]
        if p.get("fail"):
            print(f"error: [{name}] {p['fail']}", file=sys.stderr)
            return 2
        for folder in ("data", "metrics", "reports"):
            Path(folder).mkdir(exist_ok=True)
        if name == "download":
            attempts = Path(".download-attempts")          # not a DVC output: counts tries across retries
            tries = int(attempts.read_text()) + 1 if attempts.exists() else 1
            attempts.write_text(str(tries))
            if tries <= p["fail_attempts"]:
                print(f"error: [download] connection reset by example.org (attempt {tries})", file=sys.stderr)
                return 2
            Path("data/raw.txt").write_text("".join(f"line {i}\\n" for i in range(p["lines"])))
        elif name == "clean":
            lines = Path("data/raw.txt").read_text().splitlines()
            for _ in tqdm(range(300), desc="clean", file=sys.stderr, mininterval=0, miniters=1):
                time.sleep(0.002)                          # ~300 carriage-return redraws of the bar
            for _ in tqdm(range(2), desc="files", file=sys.stderr, mininterval=0, miniters=1):
                for _ in tqdm(range(5), desc="rows", file=sys.stderr, mininterval=0, miniters=1, leave=False):
                    pass                                   # nested bars move the cursor up: \x1b[A
            Path("data/clean.txt").write_text("".join(line.upper() + "\\n" for line in lines))
            Path("metrics/clean.json").write_text(json.dumps({"lines": len(lines), "split": {"train": 2, "valid": 1}}))
        elif name == "pretrain":                           # progress records as xlm_core.train.sinks writes them
            records = open(os.environ["XLM_PROGRESS_FILE"], "a") if "XLM_PROGRESS_FILE" in os.environ else None
            started = time.monotonic()
            for step in range(1, p["steps"] + 1):
                time.sleep(p["sleep_s"])
                print(f"step {step}/{p['steps']} loss {5 / step:.4f} tokens/s {1000 + step}", file=sys.stderr,
                      flush=True)
                if records:
                    records.write(json.dumps({"kind": "train", "step": step, "total": p["steps"],
                                              "elapsed_s": time.monotonic() - started,
                                              "figures": {"train/loss": 5 / step, "train/tokens_per_s": 1000 + step}})
                                  + "\\n")
                    if step % p["eval_every"] == 0 or step == p["steps"]:
                        figures = {f"valid/mlm_{what}/{lang}": value for lang in ("en", "fr")
                                   for what, value in (("loss", 3 / step ** 0.5), ("accuracy", step / 20))}
                        records.write(json.dumps({"kind": "valid", "step": step, "total": p["steps"],
                                                  "elapsed_s": time.monotonic() - started,
                                                  "figures": {**figures, "valid/tlm_loss/en-fr": 4 / step},
                                                  "unigram": {"valid/mlm_loss/en": 1.2, "valid/mlm_loss/fr": 1.2,
                                                              "valid/mlm_accuracy/en": 0.2}}) + "\\n")
                    records.flush()
            Path("data/model.txt").write_text(f"lr={p['lr']}\\n")
            Path("metrics/pretrain.json").write_text(json.dumps({"loss": 5 / p["steps"]}))
        elif name == "evaluate":
            Path("reports/eval").mkdir(exist_ok=True)
            Path("reports/eval/perplexity.png").write_bytes(bytes.fromhex(PNG))
            wide = [f"perplexity ({model}, {lang})" for model in ("trained", "baseline") for lang in LANGS]
            Path("reports/eval.md").write_text(
                "# Evaluation\\n\\n| metric | value |\\n|---|---|\\n| ppl | 12.5 |\\n\\n"
                + "| suite | " + " | ".join(wide) + " |\\n|---|" + "---|" * len(wide) + "\\n"
                + "| `flores` | " + " | ".join(str(10 + i) for i in range(len(wide))) + " |\\n\\n"
                + "![MLM perplexity per language](eval/perplexity.png)\\n\\n"
                + "- 15% of the pieces replaced by <mask>; the `<mask>` id is the last; </s> ends a row\\n")
            Path("metrics/eval.json").write_text(json.dumps({"ppl": 12.5}))
        print(f"{name}: done")
        return 0


    sys.exit(main(sys.argv[1]))
''')

# Declared out of order on purpose: the flow must follow DVC's graph, not the file.
DVC_YAML = textwrap.dedent('''
    stages:
      evaluate:
        cmd: python stage.py evaluate
        deps: [stage.py, data/model.txt]
        params: [evaluate]
        outs: [reports/eval.md, reports/eval]
        metrics:
          - metrics/eval.json:
              cache: false
      pretrain:
        cmd: python stage.py pretrain
        deps: [stage.py, data/clean.txt]
        params: [pretrain]
        outs: [data/model.txt]
        metrics:
          - metrics/pretrain.json:
              cache: false
      download:
        cmd: python stage.py download
        deps: [stage.py]
        params: [download]
        outs: [data/raw.txt]
      clean:
        cmd: python stage.py clean
        deps: [stage.py, data/raw.txt]
        params: [clean]
        outs: [data/clean.txt]
        metrics:
          - metrics/clean.json:
              cache: false
''')

PARAMS = {
    "download": {"lines": 3, "fail_attempts": 0},
    "clean": {"fail": None},
    "pretrain": {"lr": 0.1, "steps": 10, "sleep_s": 0.4, "eval_every": 3},
    "evaluate": {"fail": None},
}
DVC_ORDER = ["download", "clean", "pretrain", "evaluate"]




@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """The fixture pipeline in a fresh git + DVC repo, never run."""
    proj = new_git_dvc_repo(tmp_path_factory.mktemp("flow") / "template")
    (proj / "stage.py").write_text(STAGE_SCRIPT)
    (proj / "dvc.yaml").write_text(DVC_YAML)
    (proj / "params.yaml").write_text(yaml.safe_dump(PARAMS, sort_keys=False))
    (proj / ".gitignore").write_text(".download-attempts\n")
    return proj


@pytest.fixture(scope="module")
def first_run(template, prefect_api, tmp_path_factory):
    """The fixture project after one complete flow run: (project, flow run state, seconds)."""
    proj = copy_project(template, tmp_path_factory.mktemp("flow") / "built")
    started = time.monotonic()
    state = xlm_flow.xlm_pipeline(project=str(proj), return_state=True)
    return proj, state, time.monotonic() - started


def copy_project(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest, symlinks=True)
    return dest


# --------------------------------------------------------------------------------------------- reading the API back
def task_runs(flow_run_id) -> list:
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return sorted(runs, key=lambda r: r.start_time or r.expected_start_time)


def task_logs(task_run_id) -> list[str]:
    APILogHandler().flush()               # the log worker ships batches in the background
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(task_run_id=LogFilterTaskRunId(any_=[task_run_id])),
                                sort=LogSort.TIMESTAMP_ASC)
    return [log.message for log in logs]


def flow_logs(flow_run_id) -> list[str]:
    """The flow run's own log lines and its tasks'."""
    APILogHandler().flush()
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
                                sort=LogSort.TIMESTAMP_ASC)
    return [log.message for log in logs]


def artifacts(key: str | None = None, flow_run_id=None) -> list:
    with get_client(sync_client=True) as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])) if key else None,
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])) if flow_run_id else None)


def by_name(runs) -> dict:
    return {r.name: r for r in runs}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------------------------------------------- the tests
def test_flow_runs_each_stage_as_a_task_in_dvc_order(first_run):
    proj, state, _ = first_run
    assert state.is_completed(), state.message
    runs = task_runs(state.state_details.flow_run_id)
    names = [r.name for r in runs]
    assert names == DVC_ORDER
    assert names == [s.address for s in xlm_flow.plan_stages(proj)]
    assert names != list(yaml.safe_load(DVC_YAML)["stages"])        # the graph's order, not the file's
    assert all(r.state.is_completed() and r.state.name == "Completed" for r in runs), [r.state for r in runs]
    assert "never run" in runs[0].state.message
    assert dvc(proj, "status", "--json").stdout.strip() == "{}"     # dvc.lock is the record: nothing left to do

    clean = by_name(runs)["clean"]
    lines = task_logs(clean.id)
    assert "clean: done" in lines                                     # the stage's own output, not only DVC's
    redraws = [line for line in lines if line.startswith("clean:") and ("it/s]" in line or "s/it]" in line)]
    assert any("300/300" in line for line in redraws)                 # the bar's final state is always logged
    assert len(redraws) <= 5, redraws                                 # ~300 redraws collapsed

    assert not [line for line in lines if "\x1b" in line or "\r" in line]    # tqdm's cursor moves are gone
    nested = [line for line in lines if line.startswith(("files:", "rows:"))]
    assert 1 <= len(nested) <= 6 and any("2/2" in line for line in nested), nested

    table = next(a for a in artifacts("clean-metrics") if a.task_run_id == clean.id)
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert {"metric": "split.train", "value": 2} in rows and {"metric": "lines", "value": 3} in rows
    report = next(a for a in artifacts("eval-report") if a.task_run_id == by_name(runs)["evaluate"].id)
    assert "| ppl | 12.5 |" in report.data

    # DVC's `git add` / `dvc push` reminder: in no task's log, said once by the flow
    logs = flow_logs(state.state_details.flow_run_id)
    assert not [line for line in logs if "dvc push` to send" in line or "autostage" in line or "To track" in line]
    hints = [line for line in logs if "`git add " in line]
    assert len(hints) == 1 and "dvc.lock" in hints[0] and "`dvc push`" in hints[0], hints
    assert state.message == "4 stages: 4 ran, 0 skipped (up to date) (ran: download, clean, pretrain, evaluate)"


def test_eval_report_artifact_is_self_contained(first_run):
    """reports/eval.md as the UI shows it: images inlined, <mask> literal, a wide table split, not cut."""
    proj, state, _ = first_run
    evaluate = by_name(task_runs(state.state_details.flow_run_id))["evaluate"]
    report = next(a for a in artifacts("eval-report") if a.task_run_id == evaluate.id).data
    png = base64.b64encode((proj / "reports/eval/perplexity.png").read_bytes()).decode()
    assert f"![MLM perplexity per language](data:image/png;base64,{png})" in report
    assert not re.search(r"\]\((?!data:|https?:)", report)                 # no image or link at a relative path
    assert "replaced by &lt;mask&gt;; the `<mask>` id is the last; &lt;/s&gt; ends a row" in report
    assert "<mask>" not in report.replace("`<mask>`", "")

    source = (proj / "reports/eval.md").read_text()
    header = next(line for line in source.splitlines() if line.startswith("| suite |"))
    tables = [line for line in report.splitlines() if line.startswith("| suite |")]
    assert len(tables) >= 2 and all(len(line) <= 130 for line in tables), tables   # split, each fits
    shown = {cell.strip() for line in tables for cell in line.strip("|").split("|")}
    assert {cell.strip() for cell in header.strip("|").split("|")} <= shown       # no column left out
    values = {cell.strip() for line in report.splitlines() if line.startswith("| `flores` |")
              for cell in line.strip("|").split("|")}
    assert {str(10 + i) for i in range(10)} <= values


def test_second_run_skips_every_stage_quickly(first_run):
    proj, _, _ = first_run
    started = time.monotonic()
    state = xlm_flow.xlm_pipeline(project=str(proj), return_state=True)
    seconds = time.monotonic() - started
    assert state.is_completed()
    runs = task_runs(state.state_details.flow_run_id)
    assert [r.name for r in runs] == DVC_ORDER
    assert [r.state.name for r in runs] == ["Skipped"] * 4
    assert all(r.state.is_completed() and "up to date" in r.state.message for r in runs)
    assert state.result() == {name: "Skipped" for name in DVC_ORDER}
    assert state.message == "4 stages: 0 ran, 4 skipped (up to date)"
    assert artifacts(flow_run_id=state.state_details.flow_run_id) == []      # nothing new to show
    assert seconds < 15, f"an all-skipped run took {seconds:.1f}s"


def test_param_change_reruns_only_the_stages_that_depend_on_it(first_run, tmp_path):
    proj = copy_project(first_run[0], tmp_path / "proj")
    write_params(proj, lambda p: p["pretrain"].update(lr=0.2))
    state = xlm_flow.xlm_pipeline(project=str(proj), return_state=True)
    assert state.is_completed()
    runs = by_name(task_runs(state.state_details.flow_run_id))
    assert runs["download"].state.name == runs["clean"].state.name == "Skipped"
    assert runs["pretrain"].state.name == runs["evaluate"].state.name == "Completed"
    assert "changed params: pretrain.lr (0.1 -> 0.2)" in runs["pretrain"].state.message
    assert "data/model.txt modified" in runs["evaluate"].state.message
    assert (proj / "data/model.txt").read_text() == "lr=0.2\n"
    assert state.message == "4 stages: 2 ran, 2 skipped (up to date) (ran: pretrain, evaluate)"
    shown = {a.key for a in artifacts(flow_run_id=state.state_details.flow_run_id)}
    assert {"pretrain-metrics", "eval-report", "evaluate-metrics"} <= shown and "clean-metrics" not in shown, shown


def test_failing_stage_fails_the_flow_with_its_error_line(first_run, tmp_path):
    proj = copy_project(first_run[0], tmp_path / "proj")
    error = "error: [clean] data/raw.txt line 2 is empty; fix the source or drop it in params.yaml download.sources"
    write_params(proj, lambda p: p["clean"].update(fail=error.removeprefix("error: [clean] ")))
    with pytest.raises(xlm_flow.StageFailed) as raised:
        xlm_flow.xlm_pipeline(project=str(proj))
    assert error in str(raised.value) and "stage 'clean' failed: " in str(raised.value)

    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1)[0]
    assert flow_run.state.is_failed()
    runs = task_runs(flow_run.id)
    assert [r.name for r in runs] == ["download", "clean"]           # stops at the failure, like `dvc repro`
    assert runs[0].state.name == "Skipped" and runs[1].state.is_failed()
    assert error in task_logs(runs[1].id)


def test_download_is_retried_with_backoff(first_run, tmp_path, monkeypatch):
    monkeypatch.setattr(xlm_flow, "RETRY_BACKOFF_S", 0.1)             # 0.1, 0.2, 0.4 s instead of 10, 20, 40
    proj = copy_project(first_run[0], tmp_path / "proj")
    (proj / ".download-attempts").unlink()
    write_params(proj, lambda p: p["download"].update(fail_attempts=2))
    state = xlm_flow.xlm_pipeline(project=str(proj), return_state=True)
    assert state.is_completed(), state.message
    runs = by_name(task_runs(state.state_details.flow_run_id))
    assert runs["download"].run_count == 3 and runs["download"].state.name == "Completed"
    assert (proj / ".download-attempts").read_text() == "3"
    logs = task_logs(runs["download"].id)
    assert any("connection reset by example.org (attempt 2)" in line for line in logs)
    assert runs["clean"].state.name == "Skipped"                       # same data/raw.txt: nothing downstream reruns


def test_cli_runs_named_stages_and_updates_the_progress_artifacts_live(first_run, prefect_api, tmp_path):
    """`xlm flow --stages pretrain --force` in a subprocess; the test polls the progress and validation artifacts
    while it trains (Prefect keeps no history of an artifact's updates).

    They follow the records the stage appends to XLM_PROGRESS_FILE (its stderr lines carry no ETA)."""
    proj = copy_project(first_run[0], tmp_path / "proj")
    keys = ("pretrain-progress", "pretrain-validation")
    seen_before = {a.id for key in keys for a in artifacts(key)}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.flow", "--stages", "pretrain", "--force"], cwd=proj,
                            env=project_env({"PREFECT_API_URL": prefect_api}), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    observed = {key: [] for key in keys}                   # (id, data, description) of each version seen running
    while proc.poll() is None:
        for key in keys:
            for artifact in artifacts(key):
                seen = (artifact.id, artifact.data, artifact.description)
                if artifact.id not in seen_before and seen not in observed[key]:
                    observed[key].append(seen)
        time.sleep(0.1)
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, output
    assert "reporting to the Prefect server at" in output

    # 10 records 0.4 s apart, written at most every 2 s: created at step 1, updated in place at step ~6 and at step 10.
    progress = observed["pretrain-progress"]
    assert len({artifact_id for artifact_id, _, _ in progress}) == 1, progress     # one artifact, updated in place
    values = [value for _, value, _ in progress]
    assert len(set(values)) >= 3 and values == sorted(values), progress           # created, then updated twice
    final = next(a for a in artifacts("pretrain-progress") if a.id not in seen_before)
    assert final.data == 100.0
    running_mean = sum(5 / step for step in range(1, 11)) / 10                   # not the last step's 0.5000
    assert "step 10/10" in final.description and f"loss {running_mean:.4f} (mean of the last 10 logs)" in \
        final.description
    assert "1010 tokens/s" in final.description and "ETA 0s" in final.description

    # validation records at steps 3, 6, 9 and 10 (1.2 s apart, the last two 0.4 s): one table, rewritten at each
    validation = observed["pretrain-validation"]
    assert len({artifact_id for artifact_id, _, _ in validation}) == 1, validation
    steps = [re.search(r"validation at step (\d+)/10", data).group(1) for _, data, _ in validation]
    assert len(set(steps)) >= 2 and steps == sorted(steps, key=int), steps       # updated at least twice, live
    table = next(a for a in artifacts("pretrain-validation") if a.id not in seen_before).data
    assert "validation at step 10/10" in table and "| pair | tlm_loss (lower is better) |" in table
    loss = 3 / 10 ** 0.5
    assert "| language | mlm_loss (lower is better) | mlm_accuracy (higher is better) |" in table, table
    assert f"| en | {loss:.4f} (unigram 1.2000) **better** | 0.5000 (unigram 0.2000) **better** |" in table, table
    assert "| 0.5000 (step 9: 0.4500) **better** |" in table                   # no unigram for fr: the trend
    assert "| en-fr | 0.4000 (step 9: 0.4444) **better** |" in table

    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(final.flow_run_id)
        assert flow_run.flow_id == client.read_flow_by_name(xlm_flow.FLOW_NAME).id
    runs = task_runs(flow_run.id)
    assert [r.name for r in runs] == ["download", "clean", "pretrain"]   # pretrain and what it depends on
    assert [r.state.name for r in runs] == ["Skipped", "Skipped", "Completed"]
    assert "forced (--force)" in runs[2].state.message                   # up to date, rerun because forced
    assert any(line.startswith("step 10/10 loss") for line in task_logs(runs[2].id))


def test_unreachable_server_is_one_clear_line(template, tmp_path):
    proj = copy_project(template, tmp_path / "proj")
    url = f"http://127.0.0.1:{free_port()}/api"
    proc = run([sys.executable, "-m", "pipeline.flow"], proj, check=False, env=project_env({"PREFECT_API_URL": url}))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr     # one line, no traceback
    assert proc.stderr.strip().startswith(f"error: [flow] no Prefect server answers at {url}")
    assert "prefect server start" in proc.stderr and "PREFECT_API_URL= xlm flow" in proc.stderr
    assert not (proj / "dvc.lock").exists()                            # nothing ran


def test_unknown_stage_names_the_known_ones(template):
    with pytest.raises(PipelineError, match=r"stages: evaluate, pretrain, download, clean|stages: .*download"):
        xlm_flow.plan_stages(template, ["nope"])


def test_project_settings_keep_prefect_local(monkeypatch):
    """Prefect started in the project folder reads prefect.toml: local server, no analytics."""
    from prefect.settings import Settings

    for name in ("PREFECT_API_URL", "PREFECT_SERVER_ANALYTICS_ENABLED", "PREFECT_SERVER_EPHEMERAL_ENABLED"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(ROOT)
    settings = Settings()
    assert settings.api.url == "http://127.0.0.1:4200/api"
    assert settings.server.analytics_enabled is False
    assert settings.server.api.host == "127.0.0.1" and settings.server.api.port == 4200
    assert settings.server.ephemeral.enabled is True          # `PREFECT_API_URL= xlm flow` gets a temporary server


def test_dvc_repro_sends_nothing_to_a_running_prefect_server(dvc_project, prefect_api):
    """A Prefect server listening (and configured) does not turn `dvc repro` into Prefect runs: the data stages'
    fan-out runs on `task_runner: thread`, chosen in params.yaml, and never asks whether a server answers."""
    from tests.integration.test_dvc_stages import _local_sources

    def flow_run_ids() -> set:
        with get_client(sync_client=True) as client:
            return {r.id for r in client.read_flow_runs(limit=200)}

    before = flow_run_ids()
    _local_sources(dvc_project)
    proc = run([sys.executable, "-m", "dvc", "repro", "clean"], dvc_project,
               env=project_env({"PREFECT_API_URL": prefect_api}))
    assert "Running stage 'clean'" in proc.stdout and "units run on" in proc.stderr + proc.stdout
    assert flow_run_ids() == before
