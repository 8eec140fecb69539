"""Fan a data stage's independent units out to a thread pool, a Dask cluster or Prefect tasks.

The clean and shard stages split their work into units (a raw file, a language, a pair, an output shard) that depend
only on their inputs and write their output under the stage's scratch or staging folder. A stage hands its body to
``run_stage`` and the body maps each step's units with ``fan.map``; results come back in the plan's order, whatever
order the units finished in, so the output bytes are the same under every runner. DVC still runs the stage as one
unit: the fan-out is internal.

``<stage>.task_runner`` in params.yaml, and nothing else, picks where units run (never whether some Prefect server
happens to answer, so the same ``dvc repro`` behaves the same on every machine):

- ``thread`` (default): a thread pool in this process (this thread for one worker). Prefect is not imported.
- ``dask``: the Dask cluster whose scheduler is at ``<stage>.dask_address`` (``tcp://host:8786``), or a temporary
  local cluster (one single-threaded worker process per unit slot) when it is null. Needs the ``dask`` extra
  (``pip install -e '.[dask]'``) here and on every worker, with this project importable there. Units exchange files,
  not data: their inputs and outputs are paths under the stage's folders (passed as absolute paths), so on a
  multi-machine cluster ``data/`` must be on a filesystem every worker mounts at the same path.
- ``prefect``: the units run as Prefect tasks (``ThreadPoolTaskRunner``) of a flow named ``xlm-<stage>``, reported to
  the Prefect API this process is configured for (``PREFECT_API_URL``, else ./prefect.toml), which must answer. Under
  ``xlm flow`` that flow run is nested under the stage's task run, inside the one pipeline run.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
import uuid
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any, Callable, Iterator, Optional, Sequence, TypeVar

from pipeline.errors import PipelineError
from xlm_core.errors import XLMError

T = TypeVar("T")
# Set by `xlm flow` (pipeline.flow) for the stage subprocess it starts: the id of the stage's Prefect task run.
PARENT_TASK_RUN_ENV = "XLM_PREFECT_PARENT_TASK_RUN"

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


def _dask_fanout(stage: str, cfg, workers: int, stack: contextlib.ExitStack) -> FanOut:
    client = stack.enter_context(_dask_client(stage, cfg.dask_address, workers))

    def submit(fn, args, kwargs, name):
        return client.submit(fn, *args, key=f"{stage}-{name}-{uuid.uuid4().hex[:8]}", pure=False, **kwargs)

    return FanOut(submit, f"Dask at {cfg.dask_address}" if cfg.dask_address
                  else f"a temporary local Dask cluster of {workers} worker process(es)")


def _thread_fanout(stage: str, workers: int, stack: contextlib.ExitStack) -> FanOut:
    pool = InlineExecutor() if workers == 1 else stack.enter_context(ThreadPoolExecutor(workers, f"{stage}-unit"))
    return FanOut(lambda fn, args, kwargs, name: pool.submit(fn, *args, **kwargs),
                  f"a thread pool of {workers}" if workers > 1 else "this thread")


def _run_as_prefect_flow(stage: str, workers: int, body: Callable[[FanOut], T]) -> T:
    """``body`` as the flow ``xlm-<stage>``; each unit a task run named after it, on Prefect's thread pool."""
    from pipeline.prefect_server import check_prefect_api

    where = check_prefect_api(f"start one with `prefect server start` in the project folder, or set "
                              f"{stage}.task_runner: thread in params.yaml")
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE
    from prefect.task_runners import ThreadPoolTaskRunner

    def submit_task(fn, args, kwargs, name):
        unit = task(fn, name=f"{stage}.{fn.__name__}", task_run_name=name, cache_policy=NO_CACHE,
                    persist_result=False)
        return unit.submit(*args, **kwargs)

    def stage_flow() -> T:
        return body(FanOut(submit_task, f"Prefect's thread pool of {workers}"))

    stage_as_flow = flow(stage_flow, name=f"xlm-{stage}", task_runner=ThreadPoolTaskRunner(max_workers=workers),
                         persist_result=False, validate_parameters=False)
    parent = os.environ.get(PARENT_TASK_RUN_ENV)
    print(f"{stage}: units run as Prefect tasks of flow xlm-{stage}, {where}"
          + (f", nested under `xlm flow`'s task run {parent}" if parent else ""), file=sys.stderr, flush=True)
    with _user_errors_without_tracebacks(("prefect.flow_runs", "prefect.task_runs")):
        if not parent:
            return stage_as_flow()
        # Under `xlm flow` the stage runs in a `dvc repro` subprocess: its flow run is created as a subflow of the
        # stage's task run (what Prefect does itself for a flow called inside a task of the same process), so the
        # units show up inside the one `xlm-pipeline` run instead of as a separate, unlinked flow run.
        from prefect.client.orchestration import get_client
        from prefect.flow_engine import run_flow
        from prefect.states import Pending

        try:
            with get_client(sync_client=True) as client:
                flow_run = client.create_flow_run(stage_as_flow, parent_task_run_id=uuid.UUID(parent),
                                                  state=Pending())
        except Exception as exc:   # the server not yet knowing the task run (events lag), a bad id: run un-nested
            print(f"{stage}: could not nest the units under task run {parent} ({type(exc).__name__}); they run as "
                  f"a flow run of their own", file=sys.stderr, flush=True)
            return stage_as_flow()
        return run_flow(stage_as_flow, flow_run=flow_run)


class _DropUserErrorTracebacks(logging.Filter):
    """Prefect logs a failed task or flow run with its traceback; for a user error (XLMError) the stage's one
    ``error: [stage] ...`` line says it all, so the record keeps its message (the UI still shows the failure) and loses
    the traceback. A bug's exception keeps it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], XLMError):
            record.exc_info, record.exc_text = None, None
        return True


@contextlib.contextmanager
def _user_errors_without_tracebacks(logger_names: Sequence[str]) -> Iterator[None]:
    drop = _DropUserErrorTracebacks()
    loggers = [logging.getLogger(name) for name in logger_names]
    for logger in loggers:
        logger.addFilter(drop)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(drop)


def run_stage(stage: str, cfg, body: Callable[[FanOut], T], *, workers: int,
              executor: Optional[Executor] = None) -> T:
    """Run ``body(fan)``, whose ``fan.map`` calls fan the stage's units out; returns what ``body`` returns.

    ``cfg`` is the stage's params section (``task_runner``, ``dask_address``); ``workers`` is how many units run at
    once on a thread pool or a temporary local cluster (a given Dask cluster has its own size). ``executor``, when
    given (tests, embedding), runs the units instead of ``cfg.task_runner``.
    """
    if executor is not None:
        return body(FanOut(lambda fn, args, kwargs, name: executor.submit(fn, *args, **kwargs),
                           type(executor).__name__))
    workers = max(1, workers)
    if cfg.task_runner == "prefect":
        return _run_as_prefect_flow(stage, workers, body)
    with contextlib.ExitStack() as stack:
        fan = _dask_fanout(stage, cfg, workers, stack) if cfg.task_runner == "dask" \
            else _thread_fanout(stage, workers, stack)
        print(f"{stage}: units run on {fan.where}", file=sys.stderr, flush=True)
        return body(fan)
