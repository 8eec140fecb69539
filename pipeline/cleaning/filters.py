"""The clean params -> the filter objects of ``xlm_core.cleaning.filters``, and the keys of metrics' ``dropped``.

A new filter is a class there with its params as fields; here it joins the chain where it applies, and its name joins
LANG_FILTERS (or PAIR_FILTERS) where its drops are listed in metrics/clean.json.
"""
from __future__ import annotations

from pipeline.params import CleanParams
from xlm_core.cleaning.filters import (LengthRatio, MaxChars, MinChars, NotEmpty, NotIdentical, PairFilter,
                                       ScriptFilter, SegmentFilter)
from xlm_core.text import expected_scripts

# Every reason a language's row can be dropped for, in the order they apply (decoding, the segment filters, then
# step 2's ``duplicate`` and step 3's ``leak`` and ``decontaminated``); a pair row also has the pair filters.
# metrics/clean.json lists them in this order, zeros included.
LANG_FILTERS = ("invalid_utf8", "nul", "malformed", "empty", "too_short", "too_long", "script", "duplicate", "leak",
                "decontaminated")
PAIR_FILTERS = (*LANG_FILTERS, "ratio", "identical")


def segment_filters(cfg: CleanParams, lang: str) -> tuple[SegmentFilter, ...]:
    """The filters of one language's normalised segments, in the order they apply."""
    filters: list[SegmentFilter] = [NotEmpty(), MinChars(cfg.min_chars), MaxChars(cfg.max_chars)]
    scripts = expected_scripts(lang) if cfg.script_check else None
    if scripts:  # a language whose script is unknown is not checked
        filters.append(ScriptFilter(scripts, cfg.min_script_fraction))
    return tuple(filters)


def pair_filters(cfg: CleanParams) -> tuple[PairFilter, ...]:
    """The filters of an aligned pair whose sides both passed their language's filters, in the order they apply."""
    filters: list[PairFilter] = [NotIdentical()] if cfg.drop_identical_pairs else []
    filters.append(LengthRatio(cfg.max_length_ratio))
    return tuple(filters)
