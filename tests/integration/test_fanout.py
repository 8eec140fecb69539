"""pipeline.fanout: clean and shard give the same bytes on every runner (issue 7, acceptance 6).

Real components throughout: a real `distributed.LocalCluster` of two worker processes started here, real Parquet,
sqlite and sentencepiece. `task_runner: prefect` needs a Prefect server, which takes ~40 s to start on two cores:
that check is @slow.
"""
from __future__ import annotations

import json
import random
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from tests.helpers.project import project_env
from pipeline import fanout
from pipeline.clean import clean
from pipeline.errors import PipelineError
from pipeline.params import load_params
from pipeline.shard import ShardTask, encode_shard, make_shards
from pipeline.tokenizer import train_tokenizer
from tests.helpers.corpora import sentence, verse_id, write_source
from xlm_core.shards import ShardError
from xlm_core.tokenizer import Tokenizer

distributed = pytest.importorskip("distributed", reason="the dask extra: pip install -e '.[dask]'")

LANGS = ["en", "fr", "ru"]
PAIRS = ["en-fr", "en-ru"]


# ---------------------------------------------------------------------------------------------------- fixtures
def write_raw(raw: Path) -> None:
    """Two sources (a parallel one and a monolingual one): 4 raw files, 3 languages, 2 pairs, with duplicates,
    bad lines and too-short segments so every kind of unit has something to do."""
    rng = random.Random(7)
    verses = {lang: [(verse_id(i), sentence(lang, rng)) for i in range(400)] for lang in LANGS}
    verses["en"].append((verse_id(400), "x"))                   # too short
    verses["fr"].append((verse_id(401), verses["fr"][3][1]))    # a duplicate text
    write_source(raw, "bible", verses, parallel=True)
    web = [(f"web:{i + 1:09d}", sentence("en", rng)) for i in range(150)] + [b"web:000000999\tbad \xff\n"]
    write_source(raw, "web", {"en": web})


def write_params(path: Path, task_runner: str = "thread", dask_address: str | None = None) -> Path:
    runner = {"task_runner": task_runner, "dask_address": dask_address}
    path.write_text(yaml.safe_dump({
        "languages": LANGS, "pairs": PAIRS,
        "clean": {"split": {"valid": 0.15, "test": 0.15}, "batch_rows": 100, **runner},
        "tokenizer": {"model_type": "unigram", "vocab_size": 120, "character_coverage": 1.0, "max_sentences": 2000,
                      "seed": 1234, "threads": 1},
        "shard": {"rows_per_shard": 150, "batch_rows": 100, "threads": 1, **runner},
    }, allow_unicode=True))
    return path


def build(root: Path, raw: Path, tokenizer: Path, executor=None, **runner) -> Path:
    """clean + shard into ``root`` with the given runner; the tokenizer is trained once, elsewhere (not fanned out)."""
    params = write_params(root / "params.yaml", **runner)
    clean(load_params("clean", params), raw, root / "clean", root / "clean.json", executor=executor)
    make_shards(load_params("shard", params), root / "clean", tokenizer, root / "shards", root / "shard.json",
                executor=executor)
    return root


def outputs(root: Path) -> dict[str, bytes]:
    """Every file of data/clean and data/shards, and the two metrics files."""
    files = {p.relative_to(root).as_posix(): p.read_bytes()
             for folder in ("clean", "shards") for p in sorted((root / folder).rglob("*")) if p.is_file()}
    return {**files, "clean.json": (root / "clean.json").read_bytes(), "shard.json": (root / "shard.json").read_bytes()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The raw fixture, a tokenizer trained on its clean text, and the serial reference outputs."""
    root = tmp_path_factory.mktemp("fanout")
    write_raw(root / "raw")
    serial = root / "serial"
    serial.mkdir()
    params = write_params(serial / "params.yaml")
    clean(load_params("clean", params), root / "raw", serial / "clean", serial / "clean.json",
          executor=fanout.InlineExecutor())
    train_tokenizer(load_params("tokenizer", params), serial / "clean", root / "tokenizer", root / "tokenizer.json")
    make_shards(load_params("shard", params), serial / "clean", root / "tokenizer", serial / "shards",
                serial / "shard.json", executor=fanout.InlineExecutor())
    reference = outputs(serial)
    assert sum(name.startswith("shards/train/mono-") for name in reference) > 2   # several shard units per split
    return root, reference


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as c, \
            distributed.Client(c) as client:
        yield c, client


# ------------------------------------------------------------------------------------------- same bytes everywhere
def test_thread_runner_matches_a_serial_run(tmp_path, corpus, monkeypatch, capfd):
    root, reference = corpus
    monkeypatch.setattr("os.cpu_count", lambda: 4)   # a pool of 4 (clean) and 4 // shard.threads (shard) here too
    build(tmp_path, root / "raw", root / "tokenizer")
    err = capfd.readouterr().err
    assert "clean: units run on a thread pool of 4" in err and "shard: units run on a thread pool of 4" in err
    assert outputs(tmp_path) == reference


def test_dask_cluster_matches_the_default_runner(tmp_path, corpus, cluster, capfd):
    """Acceptance 6: clean + shard on a 2-worker Dask cluster write the bytes of a serial run, which are the default
    thread runner's (test above)."""
    root, reference = corpus
    local, client = cluster
    with distributed.get_task_stream(client) as stream:
        build(tmp_path, root / "raw", root / "tokenizer", task_runner="dask", dask_address=local.scheduler_address)
    assert f"units run on Dask at {local.scheduler_address}" in capfd.readouterr().err
    assert outputs(tmp_path) == reference
    # the units ran on the cluster, spread over both worker processes
    keys = [str(task["key"]) for task in stream.data]
    for unit in ("clean-clean_file bible/en", "clean-dedup_language ru", "clean-join bible en-fr",
                 "shard-train/mono-00000.parquet"):
        assert any(key.startswith(unit) for key in keys), (unit, keys)
    assert len({task["worker"] for task in stream.data}) == 2


def test_a_failing_unit_raises_its_own_error_from_a_dask_worker(tmp_path, corpus, cluster):
    local, _ = cluster
    params = load_params("shard", write_params(tmp_path / "params.yaml", "dask", local.scheduler_address))
    missing = ShardTask("train", "mono", 0, str(tmp_path / "nowhere" / "train.parquet"), 0, 10)

    tokenizer = corpus[0] / "tokenizer"

    def body(fan):
        return fan.map(encode_shard, [(missing,)], kwargs={"tokenizer_dir": str(tokenizer), "out_dir": str(tmp_path),
                                                          "tokenizer_sha256": Tokenizer.load(tokenizer).sha256,
                                                          "batch_rows": 10, "threads": 1})

    with pytest.raises(ShardError, match=r"nowhere/train\.parquet: not found; run `dvc repro clean`"):
        fanout.run_stage("shard", params.shard, body, workers=2)   # the unit's own exception, not a wrapper


def test_unreachable_dask_scheduler_is_one_clear_error(tmp_path, corpus, monkeypatch):
    root, reference = corpus
    monkeypatch.setattr(fanout, "DASK_CONNECT_TIMEOUT", "1s")
    address = f"tcp://127.0.0.1:{_free_port()}"
    params = load_params("clean", write_params(tmp_path / "params.yaml", "dask", address))
    with pytest.raises(PipelineError, match=rf"clean\.dask_address: no Dask scheduler answers at '{address}'"):
        clean(params, root / "raw", tmp_path / "clean", tmp_path / "clean.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]   # nothing written, no scratch left


# ------------------------------------------------------------------------------------------- the runner choice
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_prefect_runner_without_a_server_is_one_clear_error(tmp_path):
    """task_runner: prefect is an explicit choice: no server answering is an error, not a silent fallback."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    address = f"http://127.0.0.1:{_free_port()}/api"
    params = load_params("shard", write_params(tmp_path / "params.yaml", "prefect"))
    # Prefect reads its environment once, when first imported (an earlier test may have): set the API in its settings
    with temporary_settings(updates={PREFECT_API_URL: address}), pytest.raises(
            PipelineError, match=rf"no Prefect server answers at {address} .*set shard\.task_runner: thread in params.yaml"):
        fanout.run_stage("shard", params.shard, lambda fan: pytest.fail("the body ran"), workers=2)


# `python -m pipeline.clean --raw RAW`, reporting its exit code and whether Prefect was imported on the way
CLI_PROBE = """
import json, runpy, sys
sys.argv = ["pipeline.clean", "--raw", sys.argv[1]]
try:
    runpy.run_module("pipeline.clean", run_name="__main__")
except SystemExit as exit:
    print(json.dumps({"code": exit.code, "prefect_imported": "prefect" in sys.modules}))
"""


def test_the_stage_cli_does_not_import_prefect_with_the_thread_runner(tmp_path, corpus):
    """The default path of `python -m pipeline.clean` never pays Prefect's import (seconds), whatever prefect.toml
    names (here a server that is not running; tests/integration/test_task_runner.py runs one)."""
    root, reference = corpus
    write_params(tmp_path / "params.yaml")
    (tmp_path / "prefect.toml").write_text(f'[api]\nurl = "http://127.0.0.1:{_free_port()}/api"\n')
    env = project_env()
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.run([sys.executable, "-c", CLI_PROBE, str(root / "raw")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"code": 0, "prefect_imported": False}, proc.stderr
    assert "clean: units run on" in proc.stderr
    assert (tmp_path / "data" / "clean" / "mono" / "train.parquet").read_bytes() == reference["clean/mono/train.parquet"]


# ----------------------------------------------------------------------------------------- Prefect task runners


def _latest_run(flow_name: str, units: int) -> tuple[str, list[str]]:
    """(state name, sorted names of its completed task runs) of the newest run of ``flow_name``, once ``units`` task
    runs are recorded as completed (Prefect 3 records task-run states from events, a moment after they happen)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    deadline = time.monotonic() + 30
    with get_client(sync_client=True) as client:
        while True:
            run, = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
                                         sort=FlowRunSort.START_TIME_DESC, limit=1)
            tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
            done = sorted(t.name for t in tasks if t.state is not None and t.state.is_completed())
            if len(done) >= units or time.monotonic() > deadline:
                return run.state.name, done
            time.sleep(0.5)


@pytest.mark.slow
def test_prefect_task_runner_matches_the_default_runner(tmp_path, corpus, prefect_api, monkeypatch):
    """With task_runner: prefect, units are task runs of flow xlm-<stage> (Prefect's ThreadPoolTaskRunner): the
    same bytes, and each unit visible by name through the API."""
    root, reference = corpus
    monkeypatch.setenv("PREFECT_API_URL", prefect_api)
    build(tmp_path, root / "raw", root / "tokenizer", task_runner="prefect")
    assert outputs(tmp_path) == reference
    clean_units = sorted([f"clean_file {f}" for f in ("bible/en", "bible/fr", "bible/ru", "web/en")]
                         + [f"dedup_language {lang}" for lang in LANGS] + [f"join bible {pair}" for pair in PAIRS])
    assert _latest_run("xlm-clean", len(clean_units)) == ("Completed", clean_units)
    shard_units = sorted(name.removeprefix("shards/") for name in reference
                         if name.startswith("shards/") and name.endswith(".parquet"))
    assert _latest_run("xlm-shard", len(shard_units)) == ("Completed", shard_units)


def _unit_refusing_two(x: int) -> int:
    if x == 2:
        raise PipelineError(f"unit {x} is bad; fix it")
    return x


@pytest.mark.slow
def test_a_user_error_in_a_prefect_unit_is_one_line_without_prefects_traceback(prefect_api, monkeypatch, capfd):
    """Prefect logs a failed task and flow run with a traceback; a user error keeps Prefect's state lines but not the
    traceback, and the stage ends with its one line."""
    from types import SimpleNamespace
    from pipeline.errors import run_cli

    monkeypatch.setenv("PREFECT_API_URL", prefect_api)
    cfg = SimpleNamespace(task_runner="prefect", dask_address=None)
    code = run_cli("clean", lambda: fanout.run_stage(
        "clean", cfg, lambda fan: fan.map(_unit_refusing_two, [(1,), (2,), (3,)]), workers=2))
    err = capfd.readouterr().err
    assert code == 2 and err.rstrip().splitlines()[-1] == "error: [clean] unit 2 is bad; fix it", err[-3000:]
    assert "Flow run encountered an exception: PipelineError" in err          # the state line stays
    assert "task_engine.py" not in err and "flow_engine.py" not in err, err[-3000:]   # the traceback does not


_UNITS_IN_A_SUBPROCESS = """
import sys
from types import SimpleNamespace
from pipeline import fanout
from tests.integration.test_fanout import _unit_refusing_two
cfg = SimpleNamespace(task_runner="prefect", dask_address=None)
print(fanout.run_stage("clean", cfg, lambda fan: fan.map(_unit_refusing_two, [(1,), (3,)], names=["one", "three"]),
                       workers=2))
"""


@pytest.mark.slow
def test_under_xlm_flow_the_units_are_tasks_nested_in_the_one_flow_run(prefect_api, monkeypatch):
    """`xlm flow` runs a stage in a `dvc repro` subprocess; with task_runner: prefect the stage's flow run is created
    under the stage's task run (XLM_PREFECT_PARENT_TASK_RUN), so its units appear inside the one pipeline run."""
    from prefect import flow, task
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentTaskRunId, FlowRunFilterId
    from prefect.context import TaskRunContext

    monkeypatch.setenv("PREFECT_API_URL", prefect_api)

    @task(name="clean")
    def stage() -> str:
        env = project_env({"PREFECT_API_URL": prefect_api,
                           fanout.PARENT_TASK_RUN_ENV: str(TaskRunContext.get().task_run.id)})
        proc = subprocess.run([sys.executable, "-c", _UNITS_IN_A_SUBPROCESS], env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0 and proc.stdout.strip() == "[1, 3]", proc.stderr[-3000:]
        return str(TaskRunContext.get().task_run.id)

    @flow(name="xlm-pipeline-test")
    def pipeline_run() -> str:
        return stage()

    parent_task_run = pipeline_run()
    deadline = time.monotonic() + 30
    with get_client(sync_client=True) as client:
        while True:
            nested = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_task_run_id=FlowRunFilterParentTaskRunId(any_=[parent_task_run])))
            units = client.read_task_runs(flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[r.id for r in nested]))) if nested else []
            if len([u for u in units if u.state is not None and u.state.is_completed()]) >= 2 \
                    or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    assert len(nested) == 1 and nested[0].state.is_completed(), nested
    assert sorted(u.name for u in units) == ["one", "three"]


def test_thread_pool_given_by_the_caller_matches_too(tmp_path, corpus):
    """The `executor=` hook (embedding, tests) takes the same path: results in plan order whatever finishes first."""
    root, reference = corpus
    with ThreadPoolExecutor(max_workers=3) as pool:
        build(tmp_path, root / "raw", root / "tokenizer", executor=pool)
    assert outputs(tmp_path) == reference
