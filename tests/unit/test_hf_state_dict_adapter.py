"""xlm_core.hf.XLMRobertaStateDictAdapter: the class form of the mapping gives the functions' results, both ways."""
from __future__ import annotations

import torch

from xlm_core.hf import XLMRobertaStateDictAdapter, from_hf, hf_config, to_hf
from xlm_core.model import XLMModel
from xlm_core.model_config import ModelConfig


def test_adapter_round_trip_matches_the_functions():
    cfg = ModelConfig.preset("tiny", vocab_size=90, n_languages=3, use_lang_emb=True)
    torch.manual_seed(0)
    ours = XLMModel(cfg).state_dict()
    adapter = XLMRobertaStateDictAdapter(cfg)
    hf = adapter.to_hf(ours)
    assert hf.keys() == to_hf(ours, cfg).keys()
    assert all(torch.equal(hf[k], v) for k, v in to_hf(ours, cfg).items())
    back = XLMRobertaStateDictAdapter.for_hf_config(hf_config(cfg))
    assert back.config == cfg
    restored = back.from_hf(hf)
    assert restored.keys() == ours.keys() and all(torch.equal(restored[k], v) for k, v in ours.items())
    function_state, function_config = from_hf(hf, hf_config(cfg))
    assert function_config == cfg and all(torch.equal(function_state[k], v) for k, v in restored.items())
