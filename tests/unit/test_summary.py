"""metrics/summary.json's figures from eval.json and pretrain.json (pipeline.summary)."""
from __future__ import annotations

from pipeline.summary import SUMMARY_KEYS, summarise


def test_the_headline_takes_the_means_and_the_pace():
    evaluated = {"mlm_accuracy": {"en": {"trained": 0.3}, "fr": {"trained": 0.2}, "mean": {"trained": 0.25}},
                 "mlm_perplexity": {"mean": {"trained": 60.0, "unigram": 300.0}},
                 "out_of_domain": {"mean": {"trained": 0.226, "baseline": 0.162}},
                 "language_id_probe": {"accuracy": {"trained": 0.99}}}
    summary = summarise(evaluated, {"steps": 3800, "seconds": 380.2, "tokens_per_s": 21237.4})
    assert list(summary) == list(SUMMARY_KEYS)
    assert summary["mlm_acc"] == 0.25 and summary["ppl"] == 60.0 and summary["ppl/uni"] == 0.2
    assert summary["ood"] == 0.226 and summary["ood_rand"] == 0.162 and summary["lid"] == 0.99
    assert summary["steps"] == 3800 and summary["tok/s"] == 21237 and summary["minutes"] == 6.3
    assert summary["in_dom"] is None                                   # not measured: null, not a made-up 0


def test_one_language_has_no_mean_entry_so_its_own_figure_is_the_headline():
    one = {"mlm_accuracy": {"en": {"trained": 0.3}}, "mlm_perplexity": {"en": {"trained": 50.0, "unigram": 400.0}}}
    summary = summarise(one, {})
    assert summary["mlm_acc"] == 0.3 and summary["ppl/uni"] == 0.125
    assert summary["steps"] is None and summary["minutes"] is None     # no pretrain.json: the pace is left out
    two_without_mean = {"mlm_accuracy": {"en": {"trained": 0.3}, "fr": {"trained": 0.2}}}
    assert summarise(two_without_mean, {})["mlm_acc"] is None
