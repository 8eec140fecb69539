"""Files the clean stage's units hand each other: Parquet in fixed row groups, read back a group at a time, and
throwaway sqlite databases."""
from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq


class ParquetSink:
    """A Parquet file written from appended Arrow tables in row groups of exactly ``rows_per_group`` rows.

    Fixed row groups make the bytes independent of how callers happen to batch their rows. Outputs are zstd with
    dictionary encoding for the language columns only (ids and texts are nearly all distinct); scratch files use
    snappy, cheaper to write and read back once.
    """

    def __init__(self, path: Path, schema: pa.Schema, rows_per_group: int, scratch: bool = False):
        self.schema = schema
        self.rows_per_group = rows_per_group
        dictionary = [name for name in schema.names if name.endswith("lang") or name == "dropped_by"]
        self._writer = pq.ParquetWriter(path, schema, compression="snappy" if scratch else "zstd",
                                        use_dictionary=dictionary)
        self._pending: list[pa.Table] = []
        self._pending_rows = 0

    def write(self, table: pa.Table) -> None:
        if table.num_rows:
            self._pending.append(table)
            self._pending_rows += table.num_rows
            if self._pending_rows >= self.rows_per_group:
                self._flush(final=False)

    def write_columns(self, **columns: list) -> None:
        self.write(pa.table(columns, schema=self.schema))

    def _flush(self, final: bool) -> None:
        table = pa.concat_tables(self._pending) if self._pending else self.schema.empty_table()
        n = table.num_rows if final else table.num_rows // self.rows_per_group * self.rows_per_group
        if n:
            self._writer.write_table(table.slice(0, n), row_group_size=self.rows_per_group)
        rest = table.slice(n)
        self._pending = [rest] if rest.num_rows else []
        self._pending_rows = rest.num_rows

    def close(self) -> None:
        self._flush(final=True)
        self._writer.close()

    def __enter__(self) -> "ParquetSink":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_row_groups(path: Path, columns: list[str] | None = None) -> Iterator[pa.Table]:
    """A Parquet file one row group at a time. Not ``iter_batches``: it reads ahead, and with a slow consumer
    (sqlite) its buffers grow with the file."""
    parquet = pq.ParquetFile(path)
    for i in range(parquet.num_row_groups):
        yield parquet.read_row_group(i, columns=columns)


def scratch_db(path: Path) -> sqlite3.Connection:
    """A throwaway sqlite file: no journal, no fsync, a bounded page cache (memory stays flat)."""
    db = sqlite3.connect(path, isolation_level=None)
    db.executescript("PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; PRAGMA cache_size=-16384; "
                     "PRAGMA temp_store=FILE;")
    return db
