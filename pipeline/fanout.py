"""Fan a data stage's independent units out to a thread pool or a Dask cluster (issue 7).

The clean and shard stages split their work into units (a raw file, a language, a pair, an output shard) that depend
only on their inputs and write their output under the stage's scratch or staging folder. A stage hands its body to
``run_stage`` and the body maps each step's units with ``fan.map``; results come back in the plan's order, whatever
order the units finished in, so the output bytes are the same under every runner. DVC still runs the stage as one
unit: the fan-out is internal.

``<stage>.task_runner`` in params.yaml picks where units run:

- ``thread`` (default): a thread pool in this process.
- ``dask``: the Dask cluster whose scheduler is at ``<stage>.dask_address`` (``tcp://host:8786``), or a temporary
  local cluster (one single-threaded worker process per unit slot) when it is null. Needs the ``dask`` extra
  (``pip install -e '.[dask]'``) here and on every worker, with this project importable there. Units exchange files,
  not data: their inputs and outputs are paths under the stage's folders (passed as absolute paths), so on a
  multi-machine cluster ``data/`` must be on a filesystem every worker mounts at the same path.

Prefect or not: Prefect 3 cannot run a flow without an API. Importing it costs seconds, a flow whose API does not
answer fails, and with no API URL it starts a temporary server (more than 30 s on a 2-core machine). So the units run
as Prefect tasks of a flow named ``xlm-<stage>`` only when a Prefect server answers: at ``PREFECT_API_URL`` when that
is set (empty = none), else at ``[api] url`` of ./prefect.toml (this project's: the local `prefect server start`;
values from Prefect profiles are not consulted). That is the case under ``xlm flow`` and whenever a user started a
server to watch runs: the units then show up in the UI, on Prefect's ``ThreadPoolTaskRunner`` or prefect-dask's
``DaskTaskRunner`` (Dask workers report their task runs to the same API, so they must reach it). Otherwise — plain
``dvc repro`` with no server — the same units run on a ``concurrent.futures.ThreadPoolExecutor`` or directly on a
``distributed.Client``, with nothing Prefect imported: no start-up cost, no hang, the same bytes.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
import tomllib
import urllib.request
import uuid
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any, Callable, Iterator, Optional, Sequence, TypeVar

from pipeline.errors import PipelineError

T = TypeVar("T")
PROBE_TIMEOUT_S = 2.0      # how long a Prefect server may take to answer /health before the units run without it
DASK_CONNECT_TIMEOUT = "20s"
DASK_HINT = "install the dask extra here and on the workers: pip install -e '.[dask]'"


class InlineExecutor(Executor):
    """Runs each call in this thread when it is submitted (a pool of one; the serial reference in tests).

    Unlike a pool it raises a unit's exception from ``submit`` itself, so no later unit runs after a failure.
    """

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()
        future.set_result(fn(*args, **kwargs))
        return future


class FanOut:
    """Maps units onto one runner; ``submit(fn, args, kwargs, name)`` returns a future with ``.result()``."""

    def __init__(self, submit: Callable[..., Any], where: str):
        self._submit = submit
        self.where = where

    def map(self, fn: Callable[..., T], calls: Sequence[tuple], *, kwargs: Optional[dict] = None,
            names: Optional[Sequence[str]] = None, on_done: Optional[Callable[[T], object]] = None) -> list[T]:
        """``[fn(*args, **kwargs) for args in calls]``, run concurrently; results in ``calls`` order.

        ``fn`` must be a module-level function and the arguments plain picklable data (paths, dataclasses, params)
        for Dask. ``on_done(result)`` runs here, in plan order, as results come in (progress bars). The first unit
        that fails raises its exception here; units not started yet are cancelled where the runner can.
        """
        names = list(names) if names is not None else [f"{fn.__name__}-{i}" for i in range(len(calls))]
        fn = _importable(fn)
        futures = []
        try:
            for args, name in zip(calls, names, strict=True):
                futures.append(self._submit(fn, tuple(args), dict(kwargs or {}), name))
            results = []
            for future in futures:
                results.append(future.result())
                if on_done is not None:
                    on_done(results[-1])
            return results
        except BaseException:
            for future in futures:
                if hasattr(future, "cancel"):
                    future.cancel()
            raise


def _importable(fn: Callable[..., T]) -> Callable[..., T]:
    """``fn`` from its importable module when the stage runs as ``python -m pipeline.<stage>`` (``fn`` then lives in
    ``__main__``): Dask workers import it by name instead of unpickling a copy of ``__main__``'s code and state."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if fn.__module__ != "__main__" or spec is None or not spec.name:
        return fn
    return getattr(importlib.import_module(spec.name), fn.__name__, fn)


# ------------------------------------------------------------------------------------------------- Prefect or not
def _configured_api_url() -> str:
    if "PREFECT_API_URL" in os.environ:
        return os.environ["PREFECT_API_URL"].strip()
    try:
        with open("prefect.toml", "rb") as fh:
            url = tomllib.load(fh).get("api", {}).get("url", "")
    except (OSError, tomllib.TOMLDecodeError):
        return ""
    return url.strip() if isinstance(url, str) else ""


def prefect_api() -> Optional[str]:
    """The Prefect API URL when a server answers there within PROBE_TIMEOUT_S, else None (never imports Prefect)."""
    url = _configured_api_url()
    if not url.startswith(("http://", "https://")):
        return None
    request = urllib.request.Request(url.rstrip("/") + "/health")
    if os.environ.get("PREFECT_API_KEY"):
        request.add_header("Authorization", f"Bearer {os.environ['PREFECT_API_KEY']}")
    try:
        with urllib.request.urlopen(request, timeout=PROBE_TIMEOUT_S) as response:
            return url if response.status == 200 else None
    except (OSError, ValueError):  # refused, timed out, HTTP error, malformed URL
        return None


# -------------------------------------------------------------------------------------------------- the runners
def _local_cluster_kwargs(workers: int) -> dict:
    # One single-threaded process per unit slot: units are CPU-bound Python (the GIL) or run their own threads.
    return {"n_workers": workers, "threads_per_worker": 1, "processes": True, "dashboard_address": None,
            "silence_logs": logging.WARNING}


def _import_distributed():
    try:
        import distributed
    except ImportError:
        raise PipelineError(f"task_runner: dask needs the distributed package ({DASK_HINT}), or set task_runner: "
                            "thread in params.yaml") from None
    return distributed


@contextlib.contextmanager
def _dask_client(stage: str, address: Optional[str], workers: int) -> Iterator[Any]:
    distributed = _import_distributed()
    with contextlib.ExitStack() as stack:
        if address:
            try:
                client = stack.enter_context(distributed.Client(address, timeout=DASK_CONNECT_TIMEOUT,
                                                                set_as_default=False))
            except (OSError, TimeoutError) as exc:
                raise PipelineError(f"{stage}.dask_address: no Dask scheduler answers at {address!r} "
                                    f"({type(exc).__name__}: {exc}); start the cluster (`dask scheduler`, "
                                    "`dask worker ADDRESS`), fix the address in params.yaml, or set it to null for a "
                                    "temporary local cluster") from None
        else:
            cluster = stack.enter_context(distributed.LocalCluster(**_local_cluster_kwargs(workers)))
            client = stack.enter_context(distributed.Client(cluster, set_as_default=False))
        yield client


def _plain_fanout(stage: str, cfg, workers: int, stack: contextlib.ExitStack) -> FanOut:
    """Without Prefect: a thread pool (in this thread for one worker) or a distributed.Client."""
    if cfg.task_runner == "dask":
        client = stack.enter_context(_dask_client(stage, cfg.dask_address, workers))

        def submit_dask(fn, args, kwargs, name):
            return client.submit(fn, *args, key=f"{stage}-{name}-{uuid.uuid4().hex[:8]}", pure=False, **kwargs)

        return FanOut(submit_dask, f"Dask at {cfg.dask_address}" if cfg.dask_address
                      else f"a temporary local Dask cluster of {workers} worker process(es)")
    pool = InlineExecutor() if workers == 1 else stack.enter_context(ThreadPoolExecutor(workers, f"{stage}-unit"))
    return FanOut(lambda fn, args, kwargs, name: pool.submit(fn, *args, **kwargs),
                  f"a thread pool of {workers}" if workers > 1 else "this thread")


def _prefect_task_runner(stage: str, cfg, workers: int):
    if cfg.task_runner == "dask":
        _import_distributed()
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError:
            raise PipelineError(f"task_runner: dask needs prefect-dask ({DASK_HINT}), or set task_runner: thread "
                                "in params.yaml") from None
        if cfg.dask_address:
            with _dask_client(stage, cfg.dask_address, workers):
                pass  # the runner connects inside the flow, where a bad address would end in a traceback
            return DaskTaskRunner(address=cfg.dask_address)
        return DaskTaskRunner(cluster_kwargs=_local_cluster_kwargs(workers))
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=workers)


# The bodies of the running stage flows, by flow-run key. Prefect ships the flow object and its parameters to every
# Dask task it submits, so the flow function is module-level and takes only this key: the body (a closure over the
# stage's state, progress bars included) never leaves this process.
_STAGE_BODIES: dict[str, Callable[[], Any]] = {}


def _stage_flow(body_key: str) -> Any:
    logging.getLogger("distributed").setLevel(logging.WARNING)  # Prefect's logging setup lets its INFO through
    return _STAGE_BODIES[body_key]()


def _run_as_prefect_flow(stage: str, cfg, workers: int, body: Callable[[FanOut], T]) -> T:
    """``body`` as the flow ``xlm-<stage>``; each unit a task run named after it, on the params' task runner."""
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE

    def submit_task(fn, args, kwargs, name):
        unit = task(fn, name=f"{stage}.{fn.__name__}", task_run_name=name, cache_policy=NO_CACHE,
                    persist_result=False)
        return unit.submit(*args, **kwargs)

    where = (f"Dask at {cfg.dask_address}" if cfg.dask_address else "a temporary local Dask cluster") \
        if cfg.task_runner == "dask" else f"Prefect's thread pool of {workers}"
    key = f"{stage}-{uuid.uuid4().hex}"
    _STAGE_BODIES[key] = lambda: body(FanOut(submit_task, where))
    try:
        return flow(_stage_flow, name=f"xlm-{stage}", task_runner=_prefect_task_runner(stage, cfg, workers),
                    persist_result=False, validate_parameters=False)(key)
    finally:
        del _STAGE_BODIES[key]


def run_stage(stage: str, cfg, body: Callable[[FanOut], T], *, workers: int,
              executor: Optional[Executor] = None) -> T:
    """Run ``body(fan)``, whose ``fan.map`` calls fan the stage's units out; returns what ``body`` returns.

    ``cfg`` is the stage's params section (``task_runner``, ``dask_address``); ``workers`` is how many units run at
    once on a thread pool or a temporary local cluster (a given Dask cluster has its own size). ``executor``, when
    given (tests, embedding), runs the units instead and Prefect is not used.
    """
    if executor is not None:
        return body(FanOut(lambda fn, args, kwargs, name: executor.submit(fn, *args, **kwargs),
                           type(executor).__name__))
    workers = max(1, workers)
    api = prefect_api()
    if api is not None:
        print(f"{stage}: units run as Prefect tasks ({cfg.task_runner} runner) of flow xlm-{stage} on {api}",
              file=sys.stderr, flush=True)
        return _run_as_prefect_flow(stage, cfg, workers, body)
    with contextlib.ExitStack() as stack:
        fan = _plain_fanout(stage, cfg, workers, stack)
        print(f"{stage}: units run on {fan.where}", file=sys.stderr, flush=True)
        return body(fan)
