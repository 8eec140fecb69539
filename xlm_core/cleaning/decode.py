"""A raw ``id<TAB>text`` line (docs/data-layout.md, data/raw) to its id and text, or the reason it is dropped."""
from __future__ import annotations

# Reasons a raw line is dropped before any filter sees its text (keys of metrics/clean.json's ``dropped``).
DECODE_REASONS = ("invalid_utf8", "nul", "malformed", "empty", "too_long")


def _segment_id(id_bytes: bytes) -> str | None:
    try:
        seg_id = id_bytes.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return seg_id if seg_id.strip() and "\x00" not in seg_id else None


def decode_line(line: bytes, over_limit: bool) -> tuple[str | None, str | None, str | None]:
    """(id, raw text, dropped_by) of one raw line (as ``xlm_core.lines.bounded_lines`` yields it); never raises.

    The id is kept when usable, even for a dropped line, so a pair can tell which filter dropped its side. A line
    over the reader's limit is ``too_long`` (only its head was read, enough for the id)."""
    line = line.rstrip(b"\r\n")
    if not over_limit and b"\x00" not in line:  # the common case: one decode of the whole line
        try:
            seg_id, tab, text = line.decode("utf-8").partition("\t")
            if tab and seg_id.strip():
                return seg_id, text, None
        except UnicodeDecodeError:
            pass
    if not line.strip():
        return None, None, "empty"
    id_bytes, tab, _ = line.partition(b"\t")
    seg_id = _segment_id(id_bytes) if tab else None
    if b"\x00" in line:  # a NUL byte means binary or UTF-16 data, not text
        return seg_id, None, "nul"
    if not tab or not id_bytes.strip():
        return None, None, "malformed"
    if seg_id is None:
        return None, None, "invalid_utf8"
    if over_limit:
        return seg_id, None, "too_long"
    return seg_id, None, "invalid_utf8"  # the id decodes, so the text does not
