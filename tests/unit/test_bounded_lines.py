"""xlm_core.lines.bounded_lines, the one line reader of download and clean: a line over the limit (its line end
aside) is reported with its head only, the rest skipped, and the next line is read whole."""
from __future__ import annotations

import io

from xlm_core.cleaning.decode import decode_line
from xlm_core.lines import bounded_lines


def test_lines_up_to_the_limit_are_whole_and_longer_ones_are_skipped_after_their_head(monkeypatch):
    monkeypatch.setattr("xlm_core.lines.SKIP_CHUNK", 3)  # the rest of a long line is skipped in several chunks
    data = b"12345678\n" + b"123456789\n" + b"x:1\t" + b"y" * 40 + b"\n" + b"last, no line end"
    assert list(bounded_lines(io.BytesIO(data), 8)) == [
        (b"12345678\n", False),                # exactly the limit, line end aside
        (b"123456789", True),                  # one byte over: its first limit + 1 bytes
        (b"x:1\tyyyyy", True),
        (b"last, no ", True),                  # the last line, without a line end, is no exception
    ]
    assert list(bounded_lines(io.BytesIO(b"a\r\n\nb"), 8)) == [(b"a\r\n", False), (b"\n", False), (b"b", False)]


def test_clean_keeps_the_id_of_an_overlong_line_and_drops_it_as_too_long():
    head, over = next(bounded_lines(io.BytesIO(b"bible:001\t" + b"word " * 100 + b"\n"), 32))
    assert over and decode_line(head, over) == ("bible:001", None, "too_long")
    assert decode_line(b"bible:002\tIn the beginning\r\n", False) == ("bible:002", "In the beginning", None)
    assert decode_line(b"bible:003\tbad \xff\n", False) == ("bible:003", None, "invalid_utf8")
    assert decode_line(b"no tab\n", False) == (None, None, "malformed")
