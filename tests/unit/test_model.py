"""xlm_core.model: config validation, attention semantics, init, bookkeeping helpers, learning, compile, autocast."""
from __future__ import annotations

import math
import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from xlm_core.model import SelfAttention, XLMModel, fixed_position_table, sinusoidal_table
from xlm_core.model_config import ModelConfig, PRESETS
from xlm_core.masking import mask_tokens
from xlm_core.objectives import build_mono_batch, mlm_loss
from xlm_core.settings import MaskingConfig
from xlm_core.special_tokens import PAD

VOCAB = 101


def tiny(**overrides) -> ModelConfig:
    return ModelConfig.preset("tiny", **{"vocab_size": VOCAB, "dropout": 0.0, "attention_dropout": 0.0, **overrides})


def random_ids(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, VOCAB - 1, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def one_thread():
    """Tiny models run faster on one thread (no fork/join per op) and are deterministic across machines."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------------------------- config
def test_presets_match_xlmr_and_round_trip_through_dict():
    base = ModelConfig.preset("base", vocab_size=250_002)
    assert (base.n_layers, base.d_model, base.n_heads, base.d_ff, base.max_positions) == (12, 768, 12, 3072, 512)
    large = ModelConfig.preset("large", vocab_size=250_002)
    assert (large.n_layers, large.d_model, large.n_heads, large.d_ff) == (24, 1024, 16, 4096)
    assert set(PRESETS) == {"tiny", "small", "base", "large"}
    small = ModelConfig.preset("small", vocab_size=8002, n_languages=5, use_lang_emb=True)
    assert (small.pre_ln, small.positions, small.layer_norm_eps, small.pad_id) == (False, "learned", 1e-5, 1)
    assert ModelConfig.from_dict(small.to_dict()) == small
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        ModelConfig.preset("huge", vocab_size=100)
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['n_layer'\]"):
        ModelConfig.from_dict({**small.to_dict(), "n_layer": 3})
    with pytest.raises(ValueError, match="missing field 'vocab_size'"):
        ModelConfig.from_dict({"n_layers": 2})


@pytest.mark.parametrize("overrides, field", [
    ({"d_model": 250, "n_heads": 4}, "d_model"),
    ({"vocab_size": 4}, "vocab_size"),
    ({"n_layers": 0}, "n_layers"),
    ({"positions": "rotary"}, "positions"),
    ({"dropout": 1.0}, "dropout"),
    ({"attention_dropout": -0.1}, "attention_dropout"),
    ({"pad_id": 500}, "pad_id"),
    ({"causal": "yes"}, "causal"),
    ({"layer_norm_eps": 0}, "layer_norm_eps"),
    ({"d_ff": 2.5}, "d_ff"),
])
def test_invalid_config_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"ModelConfig\.{field} = "):
        ModelConfig(**{"vocab_size": VOCAB, **overrides})


# ----------------------------------------------------------------------------------------------------- init, counts
def test_init_is_bert_style():
    model = XLMModel(ModelConfig.preset("small", vocab_size=2000))
    for name, param in model.named_parameters():
        if name.endswith("bias"):
            assert torch.count_nonzero(param) == 0, name
        elif "_ln" in name or ".ln." in name:
            assert torch.all(param == 1), name
    assert model.tok_emb.weight[PAD].abs().sum() == 0
    assert model.blocks[0].ffn.fc_in.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.tok_emb.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_optimizer_groups_decay_only_linear_weights():
    model = XLMModel(tiny(n_languages=3, use_lang_emb=True))
    decay, no_decay = model.optimizer_param_groups(weight_decay=0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    decayed = {id(p) for p in decay["params"]}
    names = {name for name, p in model.named_parameters() if id(p) in decayed}
    linear_weights = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert names == linear_weights
    all_ids = [id(p) for group in (decay, no_decay) for p in group["params"]]
    assert sorted(all_ids) == sorted(id(p) for p in model.parameters())  # every parameter exactly once
    undecayed = {id(p) for p in no_decay["params"]}
    for table in (model.tok_emb.weight, model.pos_emb.weight, model.lang_emb.weight, model.mlm_head.bias):
        assert id(table) in undecayed


def test_num_params_counts_the_tied_decoder_once():
    cfg = tiny(n_languages=3, use_lang_emb=True)
    model = XLMModel(cfg)
    total = model.num_params(non_embedding=False)
    assert total == sum(p.numel() for p in model.parameters())
    d = cfg.d_model
    assert total - model.num_params(non_embedding=True) == (cfg.vocab_size + cfg.max_positions + 3) * d
    block = 4 * d * d + 4 * d + 2 * d * cfg.d_ff + cfg.d_ff + d + 4 * d
    head = d * d + d + 2 * d + cfg.vocab_size
    assert model.num_params(non_embedding=True) == cfg.n_layers * block + 2 * d + head


def test_flops_and_mfu():
    cfg = ModelConfig.preset("small", vocab_size=32_000)
    model = XLMModel(cfg)
    d, L, V, ff = cfg.d_model, cfg.n_layers, cfg.vocab_size, cfg.d_ff
    encoder = L * (4 * d * d + 4 * d + 2 * d * ff + ff + d + 4 * d) + 2 * d
    head = d * d + d + 2 * d + V + V * d  # dense, LayerNorm, bias, tied decoder
    gathered = model.flops_per_token(seq_len=128, projected_fraction=0.15)
    assert gathered.model == 6 * (encoder + head + cfg.max_positions * d)
    assert gathered.hardware == pytest.approx(6 * encoder + 6 * head * 0.15 + 12 * L * 128 * d)
    assert model.flops_per_token(128, 1.0).hardware > 2 * gathered.hardware  # the head is most of a full step
    util = model.estimate_mfu(tokens_per_s=4000, peak_flops=185e9, seq_len=128)
    assert util["mfu"] == pytest.approx(4000 * gathered.model / 185e9)
    assert util["hfu"] == pytest.approx(4000 * gathered.hardware / 185e9)


# -------------------------------------------------------------------------------------------------------- attention
def naive_attention(attn: SelfAttention, x: torch.Tensor, keep: torch.Tensor | None, causal: bool) -> torch.Tensor:
    """softmax(QKᵀ/√d)V written out, as the reference for the SDPA path."""
    B, T, C = x.shape
    H, hd = attn.n_heads, attn.head_dim
    q, k, v = attn.qkv(x).split(C, dim=-1)
    q, k, v = (t.view(B, T, H, hd).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    if keep is not None:
        scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
    if causal:
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C)
    return attn.proj(y)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_sdpa_equals_naive_attention(causal, padded):
    torch.manual_seed(0)
    model = XLMModel(tiny()).eval()
    attn = model.blocks[0].attn
    x = torch.randn(3, 9, model.config.d_model)
    ids = random_ids(3, 9)
    if padded:
        ids[1, 5:] = PAD
        ids[2, 2:] = PAD
    mask, sdpa_causal = model._attention_mask(ids, None, causal)
    expected = naive_attention(attn, x, ids != PAD if padded else None, causal)
    got = attn(x, mask, sdpa_causal)
    real = ids != PAD
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)


def test_no_mask_tensor_without_padding():
    model = XLMModel(tiny())
    ids = random_ids(2, 8)
    assert model._attention_mask(ids, None, False) == (None, False)
    assert model._attention_mask(ids, None, True) == (None, True)  # SDPA's own causal kernel, no mask tensor
    ids[0, 6:] = PAD
    mask, is_causal = model._attention_mask(ids, None, False)
    assert mask is not None and mask.shape == (2, 1, 1, 8) and not is_causal


def test_padding_does_not_change_real_positions():
    torch.manual_seed(0)
    model = XLMModel(tiny(n_languages=2, use_lang_emb=True)).eval()
    short, long = random_ids(1, 5, seed=1), random_ids(1, 11, seed=2)
    batch = torch.full((2, 11), PAD)
    batch[0, :5], batch[1] = short[0], long[0]
    langs = torch.tensor([1, 0])
    with torch.no_grad():
        alone = model(short, lang_ids=langs[:1]).hidden
        together = model(batch, lang_ids=langs).hidden
        explicit = model(batch, lang_ids=langs, attention_mask=batch != PAD).hidden
        more_padding = model(torch.cat([batch, torch.full((2, 4), PAD)], 1), lang_ids=langs).hidden
    torch.testing.assert_close(together[0, :5], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(explicit, together)
    torch.testing.assert_close(more_padding[:, :11][batch != PAD], together[batch != PAD], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("per_call", [True, False])
def test_causal_mode_never_looks_ahead(per_call):
    torch.manual_seed(0)
    model = XLMModel(tiny(causal=not per_call)).eval()
    ids = random_ids(2, 10)
    ids[1, 8:] = PAD
    changed = ids.clone()
    changed[:, 5] = (ids[:, 5] + 1 - 4) % (VOCAB - 5) + 4
    kwargs = {"causal": True} if per_call else {}
    with torch.no_grad():
        before, after = model(ids, **kwargs).hidden, model(changed, **kwargs).hidden
        bidirectional = model(changed, causal=False).hidden
    torch.testing.assert_close(after[:, :5], before[:, :5])
    assert (after[:, 5:8] - before[:, 5:8]).abs().amax() > 1e-3
    assert (bidirectional[:, :5] - before[:, :5]).abs().amax() > 1e-3  # and the non-causal model does look ahead


# ------------------------------------------------------------------------------------------------ forward options
def test_explicit_positions_and_language_ids():
    torch.manual_seed(0)
    model = XLMModel(tiny(n_languages=3, use_lang_emb=True)).eval()
    ids = random_ids(2, 8)
    langs = torch.tensor([2, 0])
    with torch.no_grad():
        default = model(ids, lang_ids=langs).hidden
        arange = model(ids, lang_ids=langs, position_ids=torch.arange(8).expand(2, 8)).hidden
        per_token = model(ids, lang_ids=langs[:, None].expand(2, 8)).hidden
        restarted = model(ids, lang_ids=langs, position_ids=torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]] * 2)).hidden
        other_lang = model(ids, lang_ids=torch.tensor([1, 0])).hidden
    torch.testing.assert_close(arange, default)
    torch.testing.assert_close(per_token, default)
    assert (restarted - default).abs().amax() > 1e-3
    assert (other_lang[0] - default[0]).abs().amax() > 1e-3
    torch.testing.assert_close(other_lang[1], default[1])
    with pytest.raises(ValueError, match="pass lang_ids"):
        model(ids)
    too_long = random_ids(1, model.config.max_positions + 2)
    with pytest.raises(ValueError, match="exceeds max_positions"):
        model(too_long, lang_ids=langs[:1])
    # a TLM pair may be longer than max_positions: each segment's positions restart at 0
    half = (model.config.max_positions + 2) // 2
    restart = torch.arange(half).repeat(2)[None]
    assert model(too_long, lang_ids=langs[:1], position_ids=restart).hidden.shape == (1, 2 * half, 64)


def test_sinusoidal_positions_are_a_fixed_added_table():
    table = sinusoidal_table(50, 16)
    assert torch.all(table[0, 0::2] == 0) and torch.all(table[0, 1::2] == 1)
    assert table[7, 0].item() == pytest.approx(math.sin(7)) and table[7, 1].item() == pytest.approx(math.cos(7))
    model = XLMModel(tiny(positions="sinusoidal"))
    assert model.pos_emb is None and "pos_table" not in model.state_dict()
    assert not any("pos" in name for name, _ in model.named_parameters())
    model.eval()
    ids = random_ids(1, 6)
    with torch.no_grad():
        manual = model.emb_ln(model.tok_emb(ids) + fixed_position_table(model.config)[:6])
        torch.testing.assert_close(model.embed(ids), manual)
        # scaled to the token vectors, so the LayerNorm keeps token identity: two tokens at one position differ
        assert fixed_position_table(model.config).pow(2).mean().sqrt().item() == pytest.approx(0.02, rel=0.05)
        same_position = model.embed(torch.tensor([[5], [6]]))[:, 0]
        assert F.cosine_similarity(same_position[0], same_position[1], dim=0).item() < 0.5


def test_return_layer_gives_intermediate_states():
    torch.manual_seed(0)
    model = XLMModel(tiny()).eval()
    ids = random_ids(2, 7)
    with torch.no_grad():
        out0 = model(ids, return_layer=0)
        out1 = model(ids, return_layer=1)
        last = model(ids, return_layer=-1)
        plain = model(ids)
        torch.testing.assert_close(out0.layer_hidden, model.embed(ids))
        torch.testing.assert_close(out1.layer_hidden, model.blocks[0](model.embed(ids), None, False))
    torch.testing.assert_close(last.layer_hidden, plain.hidden)
    assert plain.layer_hidden is None and plain.logits is None
    with pytest.raises(ValueError, match="return_layer = 3"):
        model(ids, return_layer=3)


@pytest.mark.parametrize("causal,pre_ln", [(False, False), (True, False), (False, True)])
def test_stop_at_layer_gives_the_same_states_and_leaves_upper_blocks_out(causal, pre_ln):
    torch.manual_seed(0)
    model = XLMModel(tiny(causal=causal, pre_ln=pre_ln))
    ids = random_ids(3, 9)
    ids[1, 6:] = PAD
    mask = ids != PAD
    for layer in range(model.config.n_layers + 1):
        full = model(ids, attention_mask=mask, return_layer=layer)
        cut = model(ids, attention_mask=mask, return_layer=layer, stop_at_layer=True)
        torch.testing.assert_close(cut.layer_hidden, full.layer_hidden)
        assert cut.logits is None
    model.zero_grad()
    model(ids, attention_mask=mask, return_layer=1, stop_at_layer=True).layer_hidden.sum().backward()
    assert all(p.grad is None for p in model.blocks[1:].parameters())    # the blocks above never ran
    assert model.blocks[0].attn.qkv.weight.grad is not None
    with pytest.raises(ValueError, match="target_index"):
        model(ids, return_layer=1, stop_at_layer=True, target_index=torch.tensor([0]))


def test_pre_ln_variant_runs_and_differs():
    torch.manual_seed(0)
    post, pre = XLMModel(tiny()), XLMModel(tiny(pre_ln=True))
    pre.load_state_dict({**post.state_dict(), "final_ln.weight": torch.ones(64), "final_ln.bias": torch.zeros(64)})
    ids = random_ids(2, 7)
    assert (pre(ids).hidden - post(ids).hidden).abs().amax() > 1e-3
    assert pre.final_ln is not None and post.final_ln is None


def test_mlm_head_at_targets_equals_full_head_gathered():
    torch.manual_seed(0)
    model = XLMModel(tiny()).eval()
    ids = random_ids(3, 9)
    target_index = torch.tensor([0, 4, 13, 26])
    with torch.no_grad():
        out = model(ids, target_index=target_index)
        full = model.mlm_logits(out.hidden)
    assert full.shape == (3, 9, VOCAB) and out.logits.shape == (4, VOCAB)
    torch.testing.assert_close(out.logits, full.reshape(-1, VOCAB)[target_index])


def test_state_dict_round_trip():
    torch.manual_seed(0)
    cfg = tiny(n_languages=2, use_lang_emb=True)
    model, fresh = XLMModel(cfg).eval(), XLMModel(cfg).eval()
    fresh.load_state_dict(model.state_dict())
    ids, langs = random_ids(2, 6), torch.tensor([0, 1])
    torch.testing.assert_close(fresh(ids, lang_ids=langs).hidden, model(ids, lang_ids=langs).hidden)


# ------------------------------------------------------------------------------------------------------- learning
def test_tiny_model_overfits_32_sentences(one_thread):
    torch.manual_seed(0)
    cfg = tiny()
    data = torch.Generator().manual_seed(0)
    sentences = [torch.randint(4, VOCAB - 1, (12,), generator=data).tolist() for _ in range(32)]
    # The 32 sentences, each 4 times per batch with a different mask: 4x the targets per step for the same cost in
    # steps (a fixed budget of 300 steps).
    batch = build_mono_batch(sentences * 4, None, max_len=16)
    model = XLMModel(cfg)
    optimizer = torch.optim.AdamW(model.optimizer_param_groups(0.0), lr=1e-2, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / 30) * max(0.02, 1 - step / 300))
    masking, generator = MaskingConfig(), torch.Generator().manual_seed(1)
    for step in range(300):
        loss, _ = mlm_loss(model, batch, masking, generator)
        if step == 0:
            assert loss.item() == pytest.approx(math.log(VOCAB), rel=0.10)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    with torch.no_grad():  # fresh masks: the model knows the sentences, not one masking of them
        final = sum(mlm_loss(model, batch, masking, generator)[0].item() for _ in range(10)) / 10
    assert final < 0.1


def _one_training_step(model: nn.Module, batch: dict, autocast: bool = False) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss, _ = mlm_loss(model, batch, MaskingConfig(), generator)
    loss.backward()
    optimizer.step()
    return loss.item()


def _padded_batch() -> dict:
    data = torch.Generator().manual_seed(0)
    lengths = [5, 14, 9, 12]
    return build_mono_batch([torch.randint(4, VOCAB - 1, (n,), generator=data).tolist() for n in lengths], None, 32)


def test_bf16_autocast_step_runs():
    torch.manual_seed(0)
    model = XLMModel(tiny(dropout=0.1)).train()
    before = model.blocks[0].attn.qkv.weight.detach().clone()
    loss = _one_training_step(model, _padded_batch(), autocast=True)
    assert math.isfinite(loss) and abs(loss - math.log(VOCAB)) < 0.5
    assert not torch.equal(model.blocks[0].attn.qkv.weight, before)
    assert model.blocks[0].attn.qkv.weight.dtype == torch.float32


def test_no_graph_breaks_in_forward():
    """torch._dynamo.explain traces the forward (no compilation): the model must be one graph."""
    torch._dynamo.reset()
    model = XLMModel(tiny())
    batch = _padded_batch()
    masked = mask_tokens(batch["input_ids"], VOCAB, MaskingConfig(), torch.Generator().manual_seed(0))
    explanation = torch._dynamo.explain(model)(masked.input_ids, attention_mask=batch["attention_mask"],
                                               target_index=masked.target_index)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.slow  # compiling forward + backward takes 30-95 s on the 2-core machines
def test_torch_compile_training_step():
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = XLMModel(tiny()).train()
    compiled_model = XLMModel(tiny()).train()
    compiled_model.load_state_dict(eager.state_dict())
    batch = _padded_batch()
    start = time.perf_counter()
    compiled_loss = _one_training_step(torch.compile(compiled_model), batch)
    print(f"compile + first step: {time.perf_counter() - start:.1f} s")
    eager_loss = _one_training_step(eager, batch)
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-4)
    torch.testing.assert_close(compiled_model.tok_emb.weight, eager.tok_emb.weight, atol=1e-5, rtol=1e-4)
