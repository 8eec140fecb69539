"""What every step counted (rows in, dropped per filter, rows out per split) and metrics/clean.json built from it."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

from pipeline.cleaning.filters import LANG_FILTERS, PAIR_FILTERS
from pipeline.params import StageParams
from xlm_core.cleaning.split import SPLITS

if TYPE_CHECKING:
    from pipeline.cleaning.segments import FileResult


@dataclass
class Counts:
    """Rows in, dropped per filter, rows out per split: rows_in == sum(dropped) + sum(rows_out) at the end."""

    filters: tuple[str, ...]
    rows_in: int = 0
    dropped: Counter = field(default_factory=Counter)
    rows_out: list[int] = field(default_factory=lambda: [0, 0, 0])

    @property
    def remaining(self) -> int:
        return self.rows_in - sum(self.dropped.values())

    def copy(self) -> "Counts":
        return Counts(self.filters, self.rows_in, Counter(self.dropped), list(self.rows_out))

    def merge(self, other: "Counts") -> "Counts":
        self.rows_in += other.rows_in
        self.dropped.update(other.dropped)
        self.rows_out = [a + b for a, b in zip(self.rows_out, other.rows_out)]
        return self

    def to_json(self) -> dict:
        unlisted = set(self.dropped) - set(self.filters)
        assert not unlisted, f"drops counted under reasons metrics do not list: {sorted(unlisted)}"
        return {"rows_in": self.rows_in,
                "dropped": {name: self.dropped.get(name, 0) for name in self.filters},
                "rows_out": dict(zip(SPLITS, self.rows_out))}

    def describe_drops(self) -> str:
        return ", ".join(f"{name} {n}" for name, n in self.dropped.most_common() if n) or "none"


def sum_counts(results: Sequence["FileResult"]) -> Counts:
    total = Counts(LANG_FILTERS)
    for r in results:
        total.merge(r.counts)
    return total


def metrics_json(files: Sequence["FileResult"], pair_counts: dict[tuple[str, str, str], Counts],
                 params: StageParams, eval_sources: dict | None = None) -> dict:
    """metrics/clean.json: per language, pair, training source (its languages and pairs) and in total; the eval
    sources' counts (``pipeline.cleaning.eval_suites``) under ``eval``, apart: they are not training text."""
    languages = {lang: Counts(LANG_FILTERS) for lang in params.languages}
    pairs = {f"{s}-{t}": Counts(PAIR_FILTERS) for s, t in params.pairs}
    sources: dict[str, dict] = {}
    for f in files:
        languages[f.raw.lang].merge(f.counts)
        sources.setdefault(f.raw.source, {"languages": {}, "pairs": {}})["languages"][f.raw.lang] = f.counts.to_json()
    for (source, s, t), c in pair_counts.items():
        pairs[f"{s}-{t}"].merge(c)
        sources[source]["pairs"][f"{s}-{t}"] = c.to_json()
    mono, para = Counts(LANG_FILTERS), Counts(PAIR_FILTERS)
    for c in languages.values():
        mono.merge(c)
    for c in pairs.values():
        para.merge(c)
    return {"languages": {k: c.to_json() for k, c in languages.items()},
            "pairs": {k: c.to_json() for k, c in pairs.items()},
            "sources": sources,
            "totals": {"mono": mono.to_json(), "para": para.to_json()},
            "eval": eval_sources or {}}
