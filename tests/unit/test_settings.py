"""xlm_core.settings and xlm_core.model_config: the one definition of each training setting and its rules."""
from __future__ import annotations

import dataclasses
import math

import pytest

from xlm_core.model_config import ModelConfig, ModelSpec, default_layer
from xlm_core.settings import (AdversarialConfig, MaskingConfig, ObjectivesConfig, check_objective_weights,
                               seq_len_doublings)


def test_a_model_spec_is_a_preset_with_overrides_and_shares_the_configs_defaults():
    spec = ModelSpec(preset="tiny", n_layers=3, init_std=0.05)
    assert spec.config(vocab_size=100, n_languages=2) == ModelConfig.preset(
        "tiny", vocab_size=100, n_languages=2, n_layers=3, init_std=0.05)
    config_defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    for name in ("dropout", "attention_dropout", "use_lang_emb", "positions", "pre_ln", "causal"):
        assert getattr(ModelSpec(), name) == config_defaults[name]


def test_a_model_spec_is_checked_by_the_configs_rules():
    with pytest.raises(ValueError, match=r"ModelConfig\.d_model = 130: must be divisible by n_heads"):
        ModelSpec(d_model=130)
    with pytest.raises(ValueError, match=r"ModelConfig\.dropout = 1\.0"):
        ModelSpec(dropout=1.0)


def test_the_adversary_reads_the_middle_layer_unless_told():
    assert [AdversarialConfig().layer_of(n) for n in (1, 2, 4, 12)] == [1, 1, 2, 6] == [default_layer(n)
                                                                                      for n in (1, 2, 4, 12)]
    assert AdversarialConfig(layer=3).layer_of(4) == 3
    with pytest.raises(ValueError, match="the model has 2 layers"):
        AdversarialConfig(layer=3).layer_of(2)
    assert not AdversarialConfig().enabled and AdversarialConfig(weight=0.1).enabled
    assert not AdversarialConfig(weight=0.1, lambda_max=0.0).enabled


@pytest.mark.parametrize("weights", [{"mlm": math.inf}, {"mlm": math.nan, "tlm": 1.0}, {"mlm": -1.0, "tlm": 1.0},
                                     {"mlm": 0.0, "tlm": 0.0}])
def test_objective_weights_are_finite_non_negative_and_one_positive(weights):
    with pytest.raises(ValueError):
        check_objective_weights(weights)
    assert check_objective_weights({"mlm": 2.0, "tlm": 0.0}) == {"mlm": 2.0, "tlm": 0.0}
    with pytest.raises(ValueError, match="clm_weight = inf"):
        ObjectivesConfig(clm_weight=math.inf)


def test_masking_shares_sum_to_one_and_the_adversary_is_finite():
    assert MaskingConfig(rate=0.4, mask=1.0, random=0.0, keep=0.0).keep == 0.0
    with pytest.raises(ValueError, match=r"mask \+ random \+ keep must be 1"):
        MaskingConfig(keep=0.2)
    with pytest.raises(ValueError, match=r"MaskingConfig\.smoothing"):
        MaskingConfig(smoothing=-0.5)
    with pytest.raises(ValueError, match=r"AdversarialConfig\.weight = inf"):
        AdversarialConfig(weight=math.inf)


def test_objectives_round_trip_with_their_nested_settings():
    cfg = ObjectivesConfig(tlm_weight=1.0, adversarial=AdversarialConfig(weight=0.1, layer=2),
                           masking=MaskingConfig(rate=0.3))
    assert ObjectivesConfig.from_dict(cfg.to_dict()) == cfg


def test_the_warm_up_ratio_is_a_power_of_two():
    assert [seq_len_doublings(128, s) for s in (128, 64, 16, 1)] == [0, 1, 3, 7]
    for start in (24, 48, 3):
        with pytest.raises(ValueError, match=f"start = {start}: seq_len \\(128\\) / start must be a power of two"):
            seq_len_doublings(128, start)
