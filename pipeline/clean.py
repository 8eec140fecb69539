"""clean stage: data/raw -> data/clean (normalise, filter, de-duplicate, split without leakage, join pairs).

The work runs in four steps, each a module of ``pipeline.cleaning``; steps 1, 2 and 4 are independent units that
``pipeline.fanout`` runs on ``clean.task_runner`` (a thread pool, or a Dask cluster). Every unit writes its result to
its own scratch file and the order results are combined in is fixed by the plan, so the output bytes do not depend on
the runner or on execution order:

1. ``segments.clean_file`` per raw file (source x language): decode line by line, normalise, the segment filters
   (``pipeline.cleaning.filters``), split by id.
2. ``dedup.dedup_language`` per language: exact de-duplication across that language's sources (first occurrence
   wins, in source order), and the keys of the language's valid/test texts.
3. ``mono.write_mono``: drop training rows whose text is any valid/test text of any language (``leak``) or an
   evaluation-suite text of the same language (``decontaminated``, with ``clean.decontaminate``), write the mono
   splits, and load the parallel sources' final segments into an on-disk id index.
4. ``pairs.join_pair`` per configured pair and parallel source: join on id, apply the pair filters;
   ``pairs.write_pairs`` appends the units' rows to the para splits in plan order.

Before them, the ``role: eval`` sources become the evaluation suites, ``eval/suites.parquet``
(``pipeline.cleaning.eval_suites``, written only through ``xlm_core.evaluation.suite_file``, always, rows or not): they
are small and read in this process, so their texts' keys are ready for step 3 whatever the runner.

Each step counts rows in, drops per reason (a filter's name) and rows out (``pipeline.cleaning.counts``), which
become metrics/clean.json (the eval sources under ``eval``).

Memory stays flat in corpus size: rows stream in small batches (outputs are written in row groups of
``clean.batch_rows``), de-duplication keys and the pair join live in scratch sqlite files, and only the keys of
valid/test texts (a small fraction) are held in memory.

Choices the issue left open:
- A pair in ``pairs`` that no parallel source provides is an error (naming the pair and the parallel sources), and so
  is a pair with no row left after filtering, like an all-filtered language: either would silently train without it.
- A pair row dropped because one side was dropped is counted under that side's filter (the source side's first).
- A segment without letters fails the script check (nothing shows it is in the language).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import Executor
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from pipeline.cleaning.counts import Counts, metrics_json, sum_counts
from pipeline.cleaning.dedup import dedup_language
from pipeline.cleaning.eval_suites import build_eval_suites
from pipeline.cleaning.filters import PAIR_FILTERS
from pipeline.cleaning.mono import write_mono
from pipeline.cleaning.pairs import SegmentStore, write_pairs
from pipeline.cleaning.plan import Plan, plan_work
from pipeline.cleaning.segments import FileResult, clean_file
from pipeline.errors import disk_full_is_an_error, fail, run_cli
from pipeline.fanout import FanOut, run_stage
from pipeline.params import PARAMS_FILE, CleanParams, StageParams, load_params
from xlm_core.atomic import atomic_dir, write_json
from xlm_core.evaluation.suite_file import SUITES_FILE, write_suites


# ------------------------------------------------------------------------------------------------------ the stage
def _check_languages_left(languages: Sequence[str], results: Sequence[FileResult],
                          left: Callable[[Counts], int]) -> None:
    for lang in languages:
        mine = [r for r in results if r.raw.lang == lang]
        counts = sum_counts(mine)
        if left(counts) == 0:
            fail(f"language {lang!r}: all {counts.rows_in} segments were filtered out ({counts.describe_drops()}) "
                 f"in {', '.join(str(r.raw.path) for r in mine)}; check the raw text or relax clean.min_chars / "
                 f"max_chars / min_script_fraction (or script_check) in params.yaml")


def _check_pairs_left(plan: Plan, pair_counts: dict[tuple[str, str, str], Counts]) -> None:
    for (src, tgt), sources in plan.pair_sources.items():
        counts = Counts(PAIR_FILTERS)
        for source in sources:
            counts.merge(pair_counts[(source, src, tgt)])
        if sum(counts.rows_out) == 0:
            fail(f"pair {src}-{tgt}: all {counts.rows_in} aligned rows of {', '.join(sources)} were filtered out "
                 f"({counts.describe_drops()}); check the raw text, relax clean.max_length_ratio / "
                 f"drop_identical_pairs in params.yaml, or remove {src}-{tgt} from pairs")


def clean(params: StageParams, raw_dir: str | Path, out_dir: str | Path,
          metrics_path: str | Path, executor: Executor | None = None) -> dict:
    """Build ``out_dir`` (mono/ and para/ splits) from ``raw_dir``; write and return the metrics.

    ``out_dir`` is replaced as a whole only on success; on any error the previous output and metrics are untouched.
    The units of steps 1, 2 and 4 run on ``clean.task_runner`` (pipeline.fanout), or on ``executor`` when given;
    the bytes written are the same either way.
    """
    plan = plan_work(params, raw_dir)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    def stage(fan: FanOut) -> dict:
        # Scratch files live next to the output and are named like atomic_dir's temporaries (<name>.tmp-<pid>-...),
        # so a killed run's leftovers are cleared by the next one. Units get absolute paths (Dask workers may run
        # in another folder).
        scratch = tempfile.TemporaryDirectory(prefix=f"{out_dir.name}.tmp-{os.getpid()}-work-", dir=out_dir.parent)
        with disk_full_is_an_error("clean", out_dir), scratch as work, atomic_dir(out_dir) as staging:
            return _run(fan, params, plan, Path(work).absolute(), staging)

    metrics = run_stage("clean", params.clean, stage, workers=os.cpu_count() or 1, executor=executor)
    write_json(metrics_path, metrics)
    _report(metrics, time.monotonic() - started)
    return metrics


def _run(fan: FanOut, params: StageParams, plan: Plan, work: Path, out_dir: Path) -> dict:
    cfg: CleanParams = params.clean
    # The evaluation suites first: step 3 decontaminates the training text against their texts.
    evals = build_eval_suites(plan.eval_sources, cfg)
    (out_dir / "eval").mkdir()
    write_suites(out_dir / "eval" / SUITES_FILE, evals.suites)
    # Step 1: independent units, one per raw file.
    raws = [replace(raw, path=raw.path.absolute()) for raw in plan.files]
    cleaned = fan.map(clean_file, [(raw, cfg, work / f"{raw.source}.{raw.lang}.parquet") for raw in raws],
                      names=[f"clean_file {raw.source}/{raw.lang}" for raw in raws])
    _check_languages_left(params.languages, cleaned, lambda c: c.remaining)
    # Step 2: independent units, one per language; within a language the files stay in plan (source) order.
    by_lang = fan.map(dedup_language, [(lang, [r for r in cleaned if r.raw.lang == lang], cfg, work)
                                       for lang in params.languages],
                      names=[f"dedup_language {lang}" for lang in params.languages])
    files = [f for r in by_lang for f in r.files]
    heldout = np.unique(np.concatenate([r.heldout_keys for r in by_lang]))
    # Step 3 needs every language's valid/test keys, and writes the mono files in plan order: one sequential pass.
    store = SegmentStore(work / "pairs.sqlite")
    try:
        write_mono(files, heldout, out_dir, cfg, store, plan, evals.keys)
        _check_languages_left(params.languages, files, lambda c: sum(c.rows_out))
        store.finish()
    finally:
        store.close()
    # Step 4: independent units, one per pair and parallel source, reading the finished store.
    pair_counts = write_pairs(fan, plan, work / "pairs.sqlite", work, out_dir, cfg)
    _check_pairs_left(plan, pair_counts)
    return metrics_json(files, pair_counts, params, evals.metrics)


def _report(metrics: dict, seconds: float) -> None:
    mono, para = metrics["totals"]["mono"], metrics["totals"]["para"]
    print(f"clean: {mono['rows_in']} segments in, mono out {mono['rows_out']}, para out {para['rows_out']} "
          f"in {seconds:.1f}s", file=sys.stderr)
    for lang, c in metrics["languages"].items():
        drops = ", ".join(f"{k} {v}" for k, v in c["dropped"].items() if v) or "none"
        print(f"  {lang}: {c['rows_in']} in, out {c['rows_out']}, dropped: {drops}", file=sys.stderr)
    for pair, c in metrics["pairs"].items():
        drops = ", ".join(f"{k} {v}" for k, v in c["dropped"].items() if v) or "none"
        print(f"  {pair}: {c['rows_in']} aligned, out {c['rows_out']}, dropped: {drops}", file=sys.stderr)
    for source, c in metrics["eval"].items():
        suites = ", ".join(f"{pair} {p['rows_out']['eval']}" for pair, p in c["pairs"].items())
        print(f"  eval suite {source}: {suites} pairs", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.clean",
                                     description="Normalise, filter, de-duplicate and split data/raw into data/clean.")
    parser.add_argument("--params", default=PARAMS_FILE, help="params file (default: %(default)s)")
    parser.add_argument("--raw", default="data/raw", help="raw corpus from the download stage (default: %(default)s)")
    parser.add_argument("--out", default="data/clean", help="output folder (default: %(default)s)")
    parser.add_argument("--metrics", default="metrics/clean.json", help="metrics file (default: %(default)s)")
    args = parser.parse_args(argv)
    return run_cli("clean", lambda: clean(load_params("clean", args.params), args.raw, args.out, args.metrics))


if __name__ == "__main__":
    sys.exit(main())
