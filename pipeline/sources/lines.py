"""From raw byte lines to ``data/raw/<source>/<lang>.tsv`` rows (``<source>:<key><TAB>text``).

A line that is not valid UTF-8, holds a NUL byte or is longer than ``MAX_LINE_BYTES`` is dropped and counted, never
fatal; a blank segment is dropped and counted too. An over-long line is skipped in bounded chunks, never held whole
(``xlm_core.lines.bounded_lines``, the reader the clean stage uses too). The line number keeps counting over dropped
lines, so ids stay aligned across the files of a parallel source ("a segment missing in one language is simply
absent from that file").
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, Iterable, Iterator, Optional

from tqdm import tqdm

from pipeline.errors import PipelineError
from pipeline.sources.archives import DECOMPRESSION_ERRORS, Member, corrupt_data
from xlm_core.lines import bounded_lines

# Everything a later reader could take for a line break (str.splitlines' set) becomes a space.
_ONE_LINE = str.maketrans(dict.fromkeys("\t\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029", " "))
_PROGRESS_EVERY = 4096
# Longer lines are no sentence: dropped (``long_lines`` in the manifest). clean.max_chars drops far shorter ones.
MAX_LINE_BYTES = 1 << 24


def one_line(text: str) -> str:
    """The segment as a single TSV field: tabs and line breaks become spaces."""
    return text.translate(_ONE_LINE)


@dataclass(slots=True)
class FileLine:
    file: str     # name for messages (path, URL, archive:member)
    number: int   # 1-based line number within that file
    raw: bytes    # the line with its line end; empty when too_long
    too_long: bool = False


class SegmentSink:
    """The ``<lang>.tsv`` files of one source, and counts of what was written and what was dropped."""

    def __init__(self, folder: Path, source: str, languages: list[str]):
        folder.mkdir(parents=True, exist_ok=True)
        self.source = source
        self._files = {lang: open(folder / f"{lang}.tsv", "w", encoding="utf-8", newline="\n") for lang in languages}
        zero = dict.fromkeys(languages, 0)
        self.counts, self.invalid_utf8, self.nul, self.empty = dict(zero), dict(zero), dict(zero), dict(zero)
        self.long = dict(zero)

    def write(self, lang: str, key: str, text: str) -> None:
        text = one_line(text)
        if not text.strip():
            self.empty[lang] += 1
            return
        self._files[lang].write(f"{self.source}:{key}\t{text}\n")
        self.counts[lang] += 1

    def close(self) -> None:
        for fh in self._files.values():
            fh.close()

    def __enter__(self) -> "SegmentSink":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class Channel:
    """One stream of lines and the languages it feeds: ``{lang: column}``, column None meaning the whole line."""

    lines: Iterator[FileLine]
    fields: dict[str, Optional[int]]
    _needed: int = field(init=False, default=0)

    def __post_init__(self):
        cols = [c for c in self.fields.values() if c is not None]
        self._needed = max(cols) + 1 if cols else 0


def file_lines(open_member: Callable[[], ContextManager[Member]], label: str) -> Iterator[FileLine]:
    """The lines of one (decompressed) file; an empty file or corrupt compressed data is one clear error."""
    with open_member() as member:
        number = 0
        try:
            for raw, too_long in bounded_lines(member.stream, MAX_LINE_BYTES):
                number += 1
                yield FileLine(member.name, number, b"" if too_long else raw, too_long)
        except DECOMPRESSION_ERRORS as exc:
            raise corrupt_data(label, member.name, exc, after=f" after line {number}") from None
        if number == 0:
            raise PipelineError(f"{label}: {member.name} is empty (no lines); check the URL/path, or remove this "
                                f"source from params.yaml")


def chain(files: Iterable[Iterator[FileLine]]) -> Iterator[FileLine]:
    for lines in files:
        yield from lines


def _decode(raw: bytes, first_line: bool) -> Optional[str]:
    """The line as text without its line ending; None for invalid UTF-8. (NUL bytes are checked by the caller.)"""
    if raw.endswith(b"\n"):
        raw = raw[:-1]
        if raw.endswith(b"\r"):
            raw = raw[:-1]
    try:
        text = raw.decode("utf-8", errors="strict")
    except UnicodeDecodeError:
        return None
    if first_line and text.startswith("\ufeff"):
        text = text[1:]  # a byte order mark is not part of the first segment
    return text


def _looks_like_utf16(first_line: bytes) -> bool:
    """A UTF-16 byte-order mark, or (none) a NUL in every other byte, as UTF-16 gives Latin text: such a file would
    otherwise be read as lines that all hold NUL bytes and be dropped line by line."""
    sample = first_line[:200]
    if first_line.startswith((b"\xff\xfe", b"\xfe\xff")):   # the mark, and a NUL (a space is 20 00 in UTF-16)
        return b"\x00" in sample
    return len(sample) >= 8 and max(sample[0::2].count(0), sample[1::2].count(0)) >= 0.8 * (len(sample) // 2)


def _add(sink: SegmentSink, channel: Channel, key: str, line: FileLine, label: str) -> None:
    langs = channel.fields
    if line.too_long:
        for lang in langs:
            sink.long[lang] += 1
        return
    if line.number == 1 and _looks_like_utf16(line.raw):
        raise PipelineError(f"{label}: {line.file} looks like UTF-16, not UTF-8; convert it (e.g. iconv -f UTF-16 -t "
                            f"UTF-8 FILE > FILE.utf8) and point params.yaml at the converted file")
    if b"\x00" in line.raw:
        for lang in langs:
            sink.nul[lang] += 1
        return
    text = _decode(line.raw, line.number == 1)
    if text is None:
        for lang in langs:
            sink.invalid_utf8[lang] += 1
        return
    if not channel._needed:
        for lang in langs:
            sink.write(lang, key, text)
        return
    if not text.strip():
        for lang in langs:
            sink.empty[lang] += 1
        return
    cells = text.split("\t")
    if len(cells) < channel._needed:
        raise PipelineError(
            f"{label}: {line.file} line {line.number}: {len(cells)} tab-separated column(s), but columns "
            f"{dict(langs)} needs {channel._needed}; fix the file or the columns")
    for lang, col in langs.items():
        sink.write(lang, key, cells[col] if col is not None else text)


def ingest(channels: list[Channel], sink: SegmentSink, label: str, max_lines: Optional[int] = None) -> int:
    """Read ``channels`` in lockstep (line k of each is one aligned segment, id ``<source>:<k>``); return lines read.

    Several channels must end together: a parallel pair whose files differ in length is not aligned.
    """
    iterators = [iter(c.lines) for c in channels]
    last_file = ["" for _ in channels]
    number = 0
    with tqdm(desc=f"{label} lines", unit=" lines", total=max_lines, file=sys.stderr, leave=False) as bar:
        while max_lines is None or number < max_lines:
            rows = [next(it, None) for it in iterators]
            if any(row is None for row in rows):
                if not all(row is None for row in rows):
                    _misaligned(channels, rows, last_file, number, label)
                break
            number += 1
            key = f"{number:09d}"
            for i, (channel, row) in enumerate(zip(channels, rows)):
                _add(sink, channel, key, row, label)  # type: ignore[arg-type]
                last_file[i] = row.file  # type: ignore[union-attr]
            if number % _PROGRESS_EVERY == 0:
                bar.update(_PROGRESS_EVERY)
        bar.update(number % _PROGRESS_EVERY)
    for it in iterators:  # stop reading (closes files and HTTP connections) when max_lines cut the stream short
        getattr(it, "close", lambda: None)()
    return number


def _misaligned(channels: list[Channel], rows: list, last_file: list[str], number: int, label: str) -> None:
    ended = [f"{'/'.join(c.fields)} ({f or 'no lines'})" for c, r, f in zip(channels, rows, last_file) if r is None]
    going = [f"{'/'.join(c.fields)} ({r.file})" for c, r in zip(channels, rows) if r is not None]
    raise PipelineError(
        f"{label}: parallel files are not line-aligned: {', '.join(ended)} ended after {number} lines while "
        f"{', '.join(going)} goes on; parallel files need the same number of lines (or set parallel: false)")
