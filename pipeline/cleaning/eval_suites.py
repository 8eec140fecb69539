"""The ``role: eval`` sources -> the evaluation suites (``data/clean/eval/suites.parquet``) and their texts' keys.

An eval source is never training text. Each of its pairs becomes one ``TextSuite`` (suite = the source name, domain
``out_of_domain``): its raw files decoded as clean decodes any raw file, every text normalised exactly as training
text is (``clean.normalization``, ``clean.strip_html``), joined on id. Only what cannot be a sentence is dropped: a
line that does not decode, or a text empty after normalisation (and so the pair it is a side of), and within one
pair an id whose source or target text equals that of an id kept before it (ids in sorted order; counted as
``duplicate``): a repeated text (one English msgid under two msgctxt, one translation of two msgids) is a tie that
retrieval cannot resolve. The other segment filters are not applied: the suite is what the evaluation measures, not
corpus text to tidy.

The keys (``xlm_core.text.text_key``) of every suite text, per language, are what step 3 decontaminates the training
text against. Eval sources are small (a few thousand sentences): they are read here, in the stage's process, before
the units run, so the suites and the keys are the same under every task runner.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.cleaning.plan import DOWNLOAD_HINT, EvalSource
from pipeline.cleaning.segments import line_limit
from pipeline.errors import fail
from pipeline.params import CleanParams
from xlm_core.cleaning.decode import DECODE_REASONS, decode_line
from xlm_core.evaluation.suite_file import TextSuite
from xlm_core.lines import bounded_lines
from xlm_core.text import normalize_text, text_key

SUITE_DOMAIN = "out_of_domain"
EVAL_SPLIT = "eval"  # the one rows_out key of an eval source's counts
PAIR_REASONS = (*DECODE_REASONS, "duplicate")  # a pair's drops: a side's decoding reason, or a repeated text


@dataclass
class EvalSuites:
    suites: list[TextSuite]          # per source (manifest order), then pair (the source's order)
    keys: dict[str, np.ndarray]      # language -> sorted unique keys of its suite texts
    metrics: dict                    # source -> {"languages": {lang: counts}, "pairs": {src-tgt: counts}}


def _counts_json(rows_in: int, dropped: Counter, kept: int, reasons: tuple[str, ...] = DECODE_REASONS) -> dict:
    return {"rows_in": rows_in, "dropped": {name: dropped.get(name, 0) for name in reasons},
            "rows_out": {EVAL_SPLIT: kept}}


def _read_file(path: Path, cfg: CleanParams, source: str) -> tuple[dict[str, str], dict[str, str], dict]:
    """(id -> normalised text, id -> why the line was dropped, counts) of one eval raw file."""
    texts: dict[str, str] = {}
    dropped_ids: dict[str, str] = {}
    dropped: Counter = Counter()
    rows_in = 0
    with open(path, "rb") as fh:
        for line, over in bounded_lines(fh, line_limit(cfg)):
            rows_in += 1
            seg_id, text, reason = decode_line(line, over)
            if text is not None:
                text = normalize_text(text, cfg.normalization, cfg.strip_html)
                reason = None if text else "empty"
            if seg_id is not None and (seg_id in texts or seg_id in dropped_ids):
                fail(f"source {source!r}: id {seg_id!r} appears twice in {path.name}, but ids must be unique within "
                     f"a file (docs/data-layout.md); {DOWNLOAD_HINT} again")
            if reason is not None:
                dropped[reason] += 1
                if seg_id is not None:
                    dropped_ids[seg_id] = reason
            else:
                texts[seg_id] = text  # type: ignore[index]
    return texts, dropped_ids, _counts_json(rows_in, dropped, len(texts))


def build_eval_suites(sources: tuple[EvalSource, ...], cfg: CleanParams) -> EvalSuites:
    """One TextSuite per (eval source, pair), the keys of their texts per language, and their counts."""
    suites: list[TextSuite] = []
    keys: dict[str, set[int]] = {}
    metrics: dict = {}
    for source in sources:
        read = {lang: _read_file(path, cfg, source.name) for lang, path in source.files.items()}
        pair_metrics = {}
        for src_lang, tgt_lang in source.pairs:
            (src_texts, src_dropped, _), (tgt_texts, tgt_dropped, _) = read[src_lang], read[tgt_lang]
            suite = TextSuite(source.name, SUITE_DOMAIN, src_lang, tgt_lang)
            dropped: Counter = Counter()
            seen_src: set[str] = set()
            seen_tgt: set[str] = set()
            aligned = sorted((set(src_texts) | set(src_dropped)) & (set(tgt_texts) | set(tgt_dropped)))
            for seg_id in aligned:
                reason = src_dropped.get(seg_id) or tgt_dropped.get(seg_id)
                if not reason and (src_texts[seg_id] in seen_src or tgt_texts[seg_id] in seen_tgt):
                    reason = "duplicate"  # a text of a kept id again: the first id keeps it, ties would cap retrieval
                if reason:  # counted under the side's reason, the source side's first (as training pairs are)
                    dropped[reason] += 1
                    continue
                seen_src.add(src_texts[seg_id])
                seen_tgt.add(tgt_texts[seg_id])
                suite.ids.append(seg_id)
                suite.src.append(src_texts[seg_id])
                suite.tgt.append(tgt_texts[seg_id])
            if not suite.ids:
                fail(f"source {source.name!r} (role eval): pair {src_lang}-{tgt_lang} has no aligned sentence "
                     f"({len(aligned)} ids in both files, all dropped: {dict(dropped) or 'none'}); check "
                     f"data/raw/{source.name}, or remove the pair from the source's pairs in download.sources")
            keys.setdefault(src_lang, set()).update(text_key(t) for t in suite.src)
            keys.setdefault(tgt_lang, set()).update(text_key(t) for t in suite.tgt)
            pair_metrics[f"{src_lang}-{tgt_lang}"] = _counts_json(len(aligned), dropped, len(suite.ids),
                                                                  PAIR_REASONS)
            suites.append(suite)
        metrics[source.name] = {"languages": {lang: counts for lang, (_, _, counts) in read.items()},
                                "pairs": pair_metrics}
    return EvalSuites(suites, {lang: np.array(sorted(k), dtype=np.int64) for lang, k in keys.items()}, metrics)
