"""The clean stage's filters as objects, in datatrove's shape: a filter says keep (``True``) or ``(False, reason)``.

A filter has a ``name``, the key its drops are counted under in metrics/clean.json's ``dropped``, and the params it
was built with as fields. Segment filters judge one normalised text; ``filter_batch`` judges a batch at once, which a
vectorised filter (the script check) overrides. Pair filters judge the two texts of an aligned pair. ``first_drops``
and ``pair_drop`` apply a chain in order: a text is dropped by the first filter that drops it, and later filters never
see it. The stage counts the reasons.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence, Union

from xlm_core.text import ratio_length, script_fractions

Verdict = Union[bool, tuple[bool, str]]  # True: keep; (False, reason): drop, counted under reason; False: under name


def _reason(verdict: Verdict, name: str) -> str:
    """The reason of a drop verdict: its own, or the filter's name for a bare False."""
    return verdict[1] if isinstance(verdict, tuple) else name


class SegmentFilter:
    """A filter of one normalised segment text."""

    name: ClassVar[str]

    def filter(self, text: str) -> Verdict:
        raise NotImplementedError

    def filter_batch(self, texts: Sequence[str]) -> list[Verdict]:
        return [self.filter(text) for text in texts]


@dataclass(frozen=True)
class NotEmpty(SegmentFilter):
    """Nothing left after normalisation (a blank or markup-only line)."""

    name: ClassVar[str] = "empty"

    def filter(self, text: str) -> Verdict:
        return True if text else (False, self.name)


@dataclass(frozen=True)
class MinChars(SegmentFilter):
    """Fewer than ``min_chars`` characters of normalised text."""

    min_chars: int
    name: ClassVar[str] = "too_short"

    def filter(self, text: str) -> Verdict:
        return True if len(text) >= self.min_chars else (False, self.name)


@dataclass(frozen=True)
class MaxChars(SegmentFilter):
    """More than ``max_chars`` characters of normalised text."""

    max_chars: int
    name: ClassVar[str] = "too_long"

    def filter(self, text: str) -> Verdict:
        return True if len(text) <= self.max_chars else (False, self.name)


@dataclass(frozen=True)
class ScriptFilter(SegmentFilter):
    """Less than ``min_fraction`` of the letters in the language's ``scripts`` (a text without letters: 0)."""

    scripts: tuple[str, ...]
    min_fraction: float
    name: ClassVar[str] = "script"

    def filter(self, text: str) -> Verdict:
        return self.filter_batch([text])[0]

    def filter_batch(self, texts: Sequence[str]) -> list[Verdict]:
        drop = (False, self.name)
        return [True if f >= self.min_fraction else drop for f in script_fractions(texts, self.scripts).tolist()]


class PairFilter:
    """A filter of an aligned pair (two normalised texts that each passed the segment filters)."""

    name: ClassVar[str]

    def filter(self, src: str, tgt: str) -> Verdict:
        raise NotImplementedError


@dataclass(frozen=True)
class NotIdentical(PairFilter):
    """Both sides the same text (untranslated copies)."""

    name: ClassVar[str] = "identical"

    def filter(self, src: str, tgt: str) -> Verdict:
        return True if src != tgt else (False, self.name)


@dataclass(frozen=True)
class LengthRatio(PairFilter):
    """One side more than ``max_ratio`` times longer than the other (``ratio_length``: CJK characters count 3)."""

    max_ratio: float
    name: ClassVar[str] = "ratio"

    def filter(self, src: str, tgt: str) -> Verdict:
        a, b = ratio_length(src), ratio_length(tgt)
        return True if max(a, b) <= self.max_ratio * min(a, b) else (False, self.name)


def first_drops(filters: Sequence[SegmentFilter], texts: list[str | None]) -> list[str | None]:
    """Per text, the reason of the first filter that drops it, or None when every filter keeps it. A None text is
    already dropped (its reason is the caller's) and is given to no filter."""
    reasons: list[str | None] = [None] * len(texts)
    alive = [i for i, text in enumerate(texts) if text is not None]
    for segment_filter in filters:
        if not alive:
            break
        verdicts = segment_filter.filter_batch([texts[i] for i in alive])
        still = []
        for i, verdict in zip(alive, verdicts):
            if verdict is True:
                still.append(i)
            else:
                reasons[i] = _reason(verdict, segment_filter.name)
        alive = still
    return reasons


def pair_drop(filters: Sequence[PairFilter], src: str, tgt: str) -> str | None:
    """The reason of the first pair filter that drops (src, tgt), or None when all keep it."""
    for pair_filter in filters:
        verdict = pair_filter.filter(src, tgt)
        if verdict is not True:
            return _reason(verdict, pair_filter.name)
    return None
