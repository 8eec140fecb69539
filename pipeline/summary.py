"""metrics/summary.json: the run's headline figures, about ten short keys, the one file `dvc metrics show` lists.

The detailed files stay (metrics/eval.json, metrics/pretrain.json, clean/tokenizer/shard counts) as outputs that
`dvc metrics show metrics/eval.json` shows on request; declared as metrics they made one table hundreds of columns
wide. Keys are short so the default table fits 120 columns; each is documented in SUMMARY_KEYS. The evaluate stage
writes it (it has the quality figures, and metrics/pretrain.json is one of its dependencies for the run's pace).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

# key -> where it comes from (shown in README.md); the order is the table's.
SUMMARY_KEYS = {
    "mlm_acc": "eval.json mlm_accuracy.mean.trained: masked-LM accuracy on the test split, mean over languages",
    "ppl": "eval.json mlm_perplexity.mean.trained: test perplexity, geometric mean over languages",
    "ppl/uni": "ppl / the unigram level's perplexity (below 1: better than guessing the commonest piece)",
    "in_dom": "eval.json in_domain.retrieval_mean.trained: top-1 retrieval on the test split's bitexts",
    "ood": "eval.json out_of_domain.mean.trained: top-1 retrieval on the held-out suites (out of domain)",
    "ood_rand": "eval.json out_of_domain.mean.baseline: the same for the random-init model",
    "lid": "eval.json language_id_probe.accuracy.trained: a fresh language-ID probe on pooled states",
    "steps": "pretrain.json steps",
    "tok/s": "pretrain.json tokens_per_s: non-padding tokens per second of training",
    "minutes": "pretrain.json seconds / 60: training time",
}


def _mean(tree: dict, metric: str, model: str) -> Optional[float]:
    """eval.json's mean over languages; with one language measured there is no mean entry, only that language."""
    mean = _at(tree, metric, "mean", model)
    if mean is not None:
        return mean
    values = [v for key in (tree.get(metric) or {}) if (v := _at(tree, metric, key, model)) is not None]
    return values[0] if len(values) == 1 else None


def _at(tree: dict, *path: str) -> Optional[float]:
    node: Any = tree
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return float(node) if isinstance(node, (int, float)) and math.isfinite(node) else None


def _short(value: Optional[float], digits: int = 4) -> Optional[float]:
    return None if value is None else float(f"{value:.{digits}g}")


def read_pretrain_metrics(path: Path) -> dict:
    """metrics/pretrain.json (pipeline/pretrain.py writes it); {} when absent or unreadable: the pace is left out."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def summarise(eval_metrics: dict, pretrain_metrics: dict) -> dict[str, Optional[float]]:
    ppl, unigram = _mean(eval_metrics, "mlm_perplexity", "trained"), _mean(eval_metrics, "mlm_perplexity", "unigram")
    seconds = _at(pretrain_metrics, "seconds")
    steps = _at(pretrain_metrics, "steps")
    values = {
        "mlm_acc": _mean(eval_metrics, "mlm_accuracy", "trained"),
        "ppl": ppl,
        "ppl/uni": ppl / unigram if ppl is not None and unigram else None,
        "in_dom": _at(eval_metrics, "in_domain", "retrieval_mean", "trained"),
        "ood": _at(eval_metrics, "out_of_domain", "mean", "trained"),
        "ood_rand": _at(eval_metrics, "out_of_domain", "mean", "baseline"),
        "lid": _at(eval_metrics, "language_id_probe", "accuracy", "trained"),
        "steps": int(steps) if steps is not None else None,
        "tok/s": round(v) if (v := _at(pretrain_metrics, "tokens_per_s")) is not None else None,
        "minutes": round(seconds / 60, 1) if seconds is not None else None,
    }
    assert list(values) == list(SUMMARY_KEYS)
    return {k: (_short(v) if isinstance(v, float) and k not in ("minutes",) else v) for k, v in values.items()}
