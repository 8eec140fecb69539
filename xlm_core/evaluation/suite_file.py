"""The evaluation-suite file (``data/clean/eval/suites.parquet``): held-out parallel sentences from other domains.

The clean stage writes it from the download sources whose ``role`` is ``eval`` (e.g. Django's message catalogs); the
evaluate stage reads it for the out-of-domain retrieval figure, and clean itself uses its texts to decontaminate the
training text. This module is the file's only writer and reader.

One row per sentence pair: ``suite`` (the source name), ``domain`` (``out_of_domain`` for an eval source), ``src_lang``,
``tgt_lang``, ``id`` (stable within the suite), ``src`` and ``tgt`` (normalised text, as clean normalises training text).
Rows are sorted by (suite, src_lang, tgt_lang, id), so the file is byte-identical for the same input.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from xlm_core.atomic import atomic_path

SUITES_FILE = "suites.parquet"
COLUMNS = ("suite", "domain", "src_lang", "tgt_lang", "id", "src", "tgt")
SCHEMA = pa.schema([(name, pa.string()) for name in COLUMNS])


@dataclass
class TextSuite:
    """Aligned sentences of one suite and language pair: ``src[i]`` translates ``tgt[i]``."""

    suite: str
    domain: str
    src_lang: str
    tgt_lang: str
    ids: list[str] = field(default_factory=list)
    src: list[str] = field(default_factory=list)
    tgt: list[str] = field(default_factory=list)

    @property
    def pair(self) -> str:
        return f"{self.src_lang}-{self.tgt_lang}"

    @property
    def name(self) -> str:
        return f"{self.suite}:{self.pair}"


def write_suites(path: str | Path, suites: list[TextSuite]) -> None:
    """Write ``suites`` to ``path`` (atomically), rows sorted as the module docstring says."""
    rows = sorted(
        (s.suite, s.domain, s.src_lang, s.tgt_lang, i, a, b)
        for s in suites for i, a, b in zip(s.ids, s.src, s.tgt, strict=True)
    )
    columns = {name: [row[k] for row in rows] for k, name in enumerate(COLUMNS)}
    table = pa.Table.from_pydict(columns, schema=SCHEMA)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_suites(path: str | Path) -> list[TextSuite]:
    """The suites of ``path`` in file order (sorted by suite, then pair); ``[]`` for a file with no rows."""
    table = pq.read_table(path, columns=list(COLUMNS))
    data = {name: table.column(name).to_pylist() for name in COLUMNS}
    out: dict[tuple[str, str, str], TextSuite] = {}
    for suite, domain, src_lang, tgt_lang, i, a, b in zip(*(data[name] for name in COLUMNS)):
        key = (suite, src_lang, tgt_lang)
        if key not in out:
            out[key] = TextSuite(suite, domain, src_lang, tgt_lang)
        entry = out[key]
        entry.ids.append(i)
        entry.src.append(a)
        entry.tgt.append(b)
    return list(out.values())
