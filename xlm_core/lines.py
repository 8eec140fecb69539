"""The one bounded line reader: download reads every source file through it, clean every raw file.

A line longer than the limit is skipped in bounded chunks, never held whole: a file without line breaks (a minified
JSON, a binary mistaken for text) would otherwise need several times its size in memory. Such a line still counts as
one line, so callers can count it and keep line numbers (download's ids) aligned.
"""
from __future__ import annotations

from typing import BinaryIO, Iterator

SKIP_CHUNK = 1 << 20  # bytes read at a time while skipping the rest of an over-long line


def bounded_lines(stream: BinaryIO, limit: int) -> Iterator[tuple[bytes, bool]]:
    """``(line, False)`` per line of at most ``limit`` bytes (its line end aside), line end included; or
    ``(head, True)`` for a longer one, ``head`` being its first ``limit + 1`` bytes and the rest skipped.

    The head is what was read anyway to see that the line is too long; clean takes the segment id from it, so a pair
    can tell that this side was dropped as ``too_long``. Download drops it.
    """
    while line := stream.readline(limit + 1):
        if len(line) <= limit or line.endswith(b"\n") and len(line) == limit + 1:
            yield line, False
            continue
        while (rest := stream.readline(SKIP_CHUNK)) and not rest.endswith(b"\n"):
            pass
        yield line, True
