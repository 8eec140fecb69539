"""The clean stage's filter objects (xlm_core.cleaning.filters): each keeps one input and drops another with its
reason, chains apply in order, and the filters the clean params build are named by keys metrics/clean.json lists."""
from __future__ import annotations

import pytest

from pipeline.cleaning.filters import LANG_FILTERS, PAIR_FILTERS, pair_filters, segment_filters
from pipeline.params import CleanParams
from xlm_core.cleaning.filters import (LengthRatio, MaxChars, MinChars, NotEmpty, NotIdentical, PairFilter,
                                       ScriptFilter, SegmentFilter, first_drops, pair_drop)

SEGMENT_CASES = [  # filter, a text it keeps, a text it drops
    (NotEmpty(), "a", ""),
    (MinChars(3), "abc", "ab"),
    (MaxChars(5), "hello", "hello!"),
    (ScriptFilter(("CYRILLIC",), 0.5), "Привет, world", "Hello, мир"),
]


@pytest.mark.parametrize("segment_filter, kept, dropped", SEGMENT_CASES, ids=lambda x: getattr(x, "name", None))
def test_a_segment_filter_keeps_or_drops_with_its_name(segment_filter, kept, dropped):
    assert segment_filter.filter(kept) is True
    assert segment_filter.filter(dropped) == (False, segment_filter.name)
    assert segment_filter.filter_batch([dropped, kept]) == [(False, segment_filter.name), True]


def test_the_script_filter_drops_a_text_without_letters():
    assert ScriptFilter(("LATIN",), 0.1).filter("12345 !?") == (False, "script")


@pytest.mark.parametrize("pair_filter, kept, dropped", [
    (NotIdentical(), ("The cat", "Le chat"), ("OK", "OK")),
    (LengthRatio(2.0), ("The cat sleeps", "Le chat dort"), ("Yes", "Oui, bien sûr, absolument")),
    (LengthRatio(2.0), ("In the beginning", "起初神创造"), ("In the beginning", "起")),  # CJK counts 3 per character
], ids=["identical", "ratio", "ratio-cjk"])
def test_a_pair_filter_keeps_or_drops_with_its_name(pair_filter, kept, dropped):
    assert pair_filter.filter(*kept) is True
    assert pair_filter.filter(*dropped) == (False, pair_filter.name)


def test_a_chain_counts_the_first_filter_that_drops_and_skips_already_dropped_texts():
    chain = (NotEmpty(), MinChars(3), MaxChars(10), ScriptFilter(("LATIN",), 0.5))
    texts = ["", "ab", "a long long text", "Привет", "Good text", None]
    assert first_drops(chain, texts) == ["empty", "too_short", "too_long", "script", None, None]
    assert first_drops((), ["x"]) == [None]
    pairs = (NotIdentical(), LengthRatio(3.0))
    assert pair_drop(pairs, "same", "same") == "identical"
    assert pair_drop(pairs, "a", "abcd") == "ratio"
    assert pair_drop(pairs, "Hello", "Bonjour") is None


def test_the_clean_params_build_the_filters_metrics_list():
    cfg = CleanParams(min_chars=2, max_chars=9, min_script_fraction=0.7, max_length_ratio=2.5)
    assert segment_filters(cfg, "ru") == (NotEmpty(), MinChars(2), MaxChars(9), ScriptFilter(("CYRILLIC",), 0.7))
    assert segment_filters(cfg, "ia") == (NotEmpty(), MinChars(2), MaxChars(9))  # no known script: not checked
    assert segment_filters(cfg.model_copy(update={"script_check": False}), "ru")[-1] == MaxChars(9)
    assert pair_filters(cfg) == (NotIdentical(), LengthRatio(2.5))
    assert pair_filters(cfg.model_copy(update={"drop_identical_pairs": False})) == (LengthRatio(2.5),)
    assert all(f.name in LANG_FILTERS for f in segment_filters(cfg, "ru"))
    assert all(f.name in PAIR_FILTERS and f.name not in LANG_FILTERS for f in pair_filters(cfg))


class _NoDigits(SegmentFilter):
    name = "digits"

    def filter(self, text):
        return not any(ch.isdigit() for ch in text)  # a bare False: counted under the filter's name


class _SameLength(PairFilter):
    name = "same_length"

    def filter(self, src, tgt):
        return len(src) != len(tgt) or (False, "same_length")


def test_a_bare_false_counts_under_the_filter_name():
    assert first_drops((_NoDigits(),), ["no digits", "route 66"]) == [None, "digits"]
    assert pair_drop((_SameLength(),), "abc", "xyz") == "same_length"
    assert pair_drop((_SameLength(),), "abc", "wxyz") is None
