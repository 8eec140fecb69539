"""xlm_core.objectives: masking statistics and determinism, TLM/mono batches, CLM, gradient reversal, total loss."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from xlm_core.model import XLMModel
from xlm_core.model_config import ModelConfig
from xlm_core.adversary import LanguageDiscriminator, adversarial_lambda, adversarial_loss, grad_reverse, masked_mean
from xlm_core.masking import frequency_weights, mask_tokens
from xlm_core.objectives import build_mono_batch, build_tlm_batch, clm_loss, mlm_loss, tlm_loss, total_loss
from xlm_core.settings import AdversarialConfig, MaskingConfig, ObjectivesConfig
from xlm_core.special_tokens import BOS, EOS, PAD, UNK, mask_id

VOCAB = 101
MASK = mask_id(VOCAB)


def tiny(**overrides) -> ModelConfig:
    return ModelConfig.preset("tiny", **{"vocab_size": VOCAB, "dropout": 0.0, "attention_dropout": 0.0, **overrides})


def sentences(n: int, seed: int = 0, low: int = 3, high: int = 15) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (n,), generator=g).tolist()
    return [torch.randint(4, VOCAB - 1, (k,), generator=g).tolist() for k in lengths]


def big_batch() -> torch.Tensor:
    """~180k ids (~125k maskable): pieces, every special id sprinkled in, and right padding."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, VOCAB - 1, (600, 300), generator=g)
    specials = torch.tensor([BOS, EOS, UNK, MASK])
    sprinkle = torch.rand(ids.shape, generator=g) < 0.05
    ids[sprinkle] = specials[torch.randint(0, 4, (int(sprinkle.sum()),), generator=g)]
    lengths = torch.randint(150, 301, (600,), generator=g)
    ids[torch.arange(300)[None, :] >= lengths[:, None]] = PAD
    return ids


# ---------------------------------------------------------------------------------------------------------- masking
def test_masking_statistics_match_the_configured_rates():
    ids = big_batch()
    cfg = MaskingConfig()
    masked = mask_tokens(ids, VOCAB, cfg, torch.Generator().manual_seed(0))
    flat, corrupted = ids.view(-1), masked.input_ids.view(-1)
    maskable = (flat >= 4) & (flat != MASK)
    assert maskable.sum() > 100_000
    chosen = torch.zeros_like(maskable)
    chosen[masked.target_index] = True
    # special tokens and padding are never targets, and everything else is untouched
    assert not chosen[~maskable].any()
    assert torch.equal(corrupted[~chosen], flat[~chosen])
    assert torch.equal(masked.targets, flat[masked.target_index])
    assert abs(chosen.sum().item() / maskable.sum().item() - 0.15) < 0.01
    new = corrupted[masked.target_index]
    n = len(new)
    as_mask = new == MASK
    kept = new == masked.targets
    randomised = ~as_mask & ~kept
    assert abs(as_mask.sum().item() / n - 0.8) < 0.01
    # a random draw can hit the original id (1 time in 96): count those with the kept ones, as the rates allow
    assert abs(randomised.sum().item() / n - 0.1 * (1 - 1 / 96)) < 0.01
    assert abs(kept.sum().item() / n - (0.1 + 0.1 / 96)) < 0.01
    assert new[randomised].min() >= 4 and new[randomised].max() <= VOCAB - 2  # real pieces only


def test_other_rates_are_honoured():
    ids = big_batch()
    cfg = MaskingConfig(rate=0.3, mask=0.5, random=0.0, keep=0.5)
    masked = mask_tokens(ids, VOCAB, cfg, torch.Generator().manual_seed(3))
    maskable = ((ids >= 4) & (ids != MASK)).sum().item()
    assert abs(len(masked.targets) / maskable - 0.3) < 0.01
    new = masked.input_ids.view(-1)[masked.target_index]
    assert abs((new == MASK).float().mean().item() - 0.5) < 0.01
    assert torch.equal(new[new != MASK], masked.targets[new != MASK])  # no random replacement at all


def test_same_seed_same_mask_and_resumable_generator():
    ids = big_batch()[:50]
    first = mask_tokens(ids, VOCAB, MaskingConfig(), torch.Generator().manual_seed(7))
    again = mask_tokens(ids, VOCAB, MaskingConfig(), torch.Generator().manual_seed(7))
    other = mask_tokens(ids, VOCAB, MaskingConfig(), torch.Generator().manual_seed(8))
    assert torch.equal(first.input_ids, again.input_ids) and torch.equal(first.target_index, again.target_index)
    assert not torch.equal(first.target_index, other.target_index)
    generator = torch.Generator().manual_seed(7)
    mask_tokens(ids, VOCAB, MaskingConfig(), generator)
    state = generator.get_state()  # what the trainer checkpoints
    second = mask_tokens(ids, VOCAB, MaskingConfig(), generator)
    restored = torch.Generator()
    restored.set_state(state)
    assert torch.equal(mask_tokens(ids, VOCAB, MaskingConfig(), restored).input_ids, second.input_ids)


def test_frequency_smoothing_favours_rare_tokens():
    frequent, rare = 10, 20
    counts = torch.full((VOCAB,), 1000.0)
    counts[frequent], counts[rare] = 1_000_000.0, 100.0
    weights = frequency_weights(counts, 0.5)
    assert weights[[BOS, PAD, EOS, UNK, MASK]].sum() == 0
    assert weights[rare] / weights[frequent] == pytest.approx(100.0)
    ids = torch.tensor([[frequent, rare] * 500] * 40)
    cfg = MaskingConfig(smoothing=0.5)
    masked = mask_tokens(ids, VOCAB, cfg, torch.Generator().manual_seed(0), target_weights=weights)
    rare_share = (masked.targets == rare).float().mean().item()
    assert rare_share > 0.9  # uniform choice would give 0.5
    with pytest.raises(ValueError, match="frequency_weights"):
        mask_tokens(ids, VOCAB, cfg, torch.Generator())


def test_masking_errors():
    with pytest.raises(ValueError, match="mask \\+ random \\+ keep"):
        MaskingConfig(mask=0.8, random=0.3)
    with pytest.raises(ValueError, match="rate"):
        MaskingConfig(rate=1.5)
    with pytest.raises(ValueError, match="no maskable token"):
        mask_tokens(torch.tensor([[BOS, EOS, PAD]]), VOCAB, MaskingConfig(), torch.Generator())


# ---------------------------------------------------------------------------------------------------------- batches
def test_mono_batch_layout():
    batch = build_mono_batch([[10, 11, 12], [20], list(range(30, 60))], [1, 0, 2], max_len=8)
    assert batch["input_ids"].tolist() == [
        [BOS, 10, 11, 12, EOS, PAD, PAD, PAD],
        [BOS, 20, EOS, PAD, PAD, PAD, PAD, PAD],
        [BOS, 30, 31, 32, 33, 34, 35, EOS],
    ]
    assert torch.equal(batch["attention_mask"], batch["input_ids"] != PAD)
    assert batch["lang_ids"].tolist() == [1, 0, 2]
    unpadded = build_mono_batch([[10, 11], [12, 13]], 3, max_len=8)
    assert "attention_mask" not in unpadded and unpadded["lang_ids"].tolist() == [3, 3]


def test_tlm_batch_layout_positions_and_languages():
    batch = build_tlm_batch([[10, 11, 12], [20]], [[40, 41], [50, 51, 52, 53, 54]], src_lang=[0, 2], tgt_lang=[1, 3],
                            max_len=16)
    assert batch["input_ids"].tolist() == [
        [BOS, 10, 11, 12, EOS, EOS, 40, 41, EOS, PAD],
        [BOS, 20, EOS, EOS, 50, 51, 52, 53, 54, EOS],
    ]
    # positions restart at the second segment (its leading </s>)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 0], [0, 1, 2, 0, 1, 2, 3, 4, 5, 6]]
    assert batch["lang_ids"].tolist() == [[0] * 5 + [1] * 4 + [0], [2] * 3 + [3] * 7]
    assert batch["attention_mask"].sum(1).tolist() == [9, 10]


def test_tlm_truncates_the_longer_side_first():
    batch = build_tlm_batch([list(range(10, 40))], [[50, 51]], 0, 1, max_len=12)
    ids = batch["input_ids"][0].tolist()
    assert len(ids) == 12 and ids[-4:] == [EOS, 50, 51, EOS] and ids[:2] == [BOS, 10]
    both_long = build_tlm_batch([list(range(10, 40))], [list(range(50, 90))], 0, 1, max_len=12)["input_ids"][0]
    assert both_long.tolist() == [BOS, 10, 11, 12, 13, EOS, EOS, 50, 51, 52, 53, EOS]


def test_tlm_masks_both_sides_and_trains():
    src, tgt = sentences(64, seed=1), sentences(64, seed=2)
    batch = build_tlm_batch(src, tgt, 0, 1, max_len=40)
    generator = torch.Generator().manual_seed(0)
    masked = mask_tokens(batch["input_ids"], VOCAB, MaskingConfig(), generator)
    second_segment = batch["lang_ids"].view(-1)[masked.target_index] == 1
    assert 0.3 < second_segment.float().mean().item() < 0.7  # targets on both sides, in proportion
    model = XLMModel(tiny(n_languages=2, use_lang_emb=True))
    loss, logs = tlm_loss(model, batch, MaskingConfig(), generator)
    loss.backward()
    assert set(logs) == {"tlm_loss", "tlm_accuracy", "tlm_targets"}
    assert logs["tlm_loss"] == pytest.approx(math.log(VOCAB), rel=0.1)
    assert model.lang_emb.weight.grad[:2].abs().sum() > 0


# ----------------------------------------------------------------------------------------------------- MLM and CLM
def test_mlm_projects_only_target_positions():
    model = XLMModel(tiny())
    shapes = []
    model.mlm_head.register_forward_hook(lambda module, args, out: shapes.append(tuple(out.shape)))
    batch = build_mono_batch(sentences(16), None, max_len=32)
    loss, logs = mlm_loss(model, batch, MaskingConfig(), torch.Generator().manual_seed(0))
    assert shapes == [(int(logs["mlm_targets"]), VOCAB)]
    maskable = ((batch["input_ids"] >= 4) & (batch["input_ids"] != MASK)).sum().item()
    assert logs["mlm_targets"] == round(0.15 * maskable)
    assert 0.0 <= logs["mlm_accuracy"] <= 1.0 and logs["mlm_loss"] == pytest.approx(loss.item())


def test_clm_predicts_the_next_real_token_causally():
    torch.manual_seed(0)
    model = XLMModel(tiny()).eval()
    batch = build_mono_batch(sentences(6), None, max_len=32)
    loss, logs = clm_loss(model, batch)
    ids = batch["input_ids"]
    with torch.no_grad():
        full = model.mlm_logits(model(ids, causal=True).hidden)
    has_next = ids[:, 1:] != PAD
    expected = F.cross_entropy(full[:, :-1][has_next], ids[:, 1:][has_next])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert logs["clm_perplexity"] == pytest.approx(math.exp(loss.item()), rel=1e-5)
    bidirectional = model.mlm_logits(model(ids, causal=False).hidden)
    assert not torch.allclose(bidirectional, full, atol=1e-4)  # clm_loss did ask for causal attention


# ------------------------------------------------------------------------------------------------------ adversarial
def test_gradient_reversal_scales_encoder_gradient_by_minus_lambda():
    torch.manual_seed(0)
    lam = 0.37
    model = XLMModel(tiny())
    discriminator = LanguageDiscriminator(64, 3, hidden=32)
    batch = build_mono_batch(sentences(6), [0, 1, 2, 0, 1, 2], max_len=32)

    def grads(coefficient: float | None):
        model.zero_grad(set_to_none=True)
        discriminator.zero_grad(set_to_none=True)
        hidden = model(batch["input_ids"], attention_mask=batch["attention_mask"], return_layer=1).layer_hidden
        pooled = masked_mean(hidden, batch["attention_mask"])
        if coefficient is not None:
            pooled = grad_reverse(pooled, coefficient)
        F.cross_entropy(discriminator(pooled), batch["lang_ids"]).backward()
        encoder = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return encoder, {n: p.grad.clone() for n, p in discriminator.named_parameters()}

    plain_encoder, plain_disc = grads(None)
    reversed_encoder, reversed_disc = grads(lam)
    assert set(plain_encoder) == set(reversed_encoder) and "blocks.0.attn.qkv.weight" in plain_encoder
    assert "blocks.1.attn.qkv.weight" not in plain_encoder  # layer 1 output does not depend on block 2
    for name in plain_encoder:
        torch.testing.assert_close(reversed_encoder[name], -lam * plain_encoder[name], atol=1e-7, rtol=1e-5)
    for name in plain_disc:
        torch.testing.assert_close(reversed_disc[name], plain_disc[name])


def test_adversarial_lambda_schedule():
    assert [adversarial_lambda(s, 10, 0.5) for s in (0, 5, 10, 50)] == [0.0, 0.25, 0.5, 0.5]
    assert adversarial_lambda(0, 0, 0.3) == 0.3


def test_masked_mean_ignores_padding():
    hidden = torch.arange(12.0).view(2, 3, 2)
    keep = torch.tensor([[True, True, False], [True, True, True]])
    assert masked_mean(hidden, keep).tolist() == [[1.0, 2.0], [8.0, 9.0]]
    assert torch.equal(masked_mean(hidden, None), hidden.mean(1))


def test_adversarial_loss_logs_per_language_accuracy():
    torch.manual_seed(0)
    discriminator = LanguageDiscriminator(8, 3, hidden=16)
    hidden = torch.randn(5, 4, 8, requires_grad=True)
    loss, logs = adversarial_loss(discriminator, hidden, None, torch.tensor([0, 0, 2, 2, 2]), 0.5,
                                  language_names=["en", "fr", "ru"])
    assert set(logs) == {"adv_loss", "adv_accuracy", "adv_lambda", "adv_accuracy/en", "adv_accuracy/ru"}
    predicted = discriminator(masked_mean(hidden, None)).argmax(-1)
    assert logs["adv_accuracy/ru"] == pytest.approx((predicted[2:] == 2).float().mean().item())
    assert logs["adv_lambda"] == 0.5 and logs["adv_loss"] == pytest.approx(loss.item())


class CountingModel(XLMModel):
    """Records the return_layer of every call, to prove the adversary costs nothing when it is off."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.asked_layers: list = []

    def forward(self, *args, **kwargs):
        self.asked_layers.append(kwargs.get("return_layer"))
        return super().forward(*args, **kwargs)


@pytest.mark.parametrize("weight, lam", [(0.0, 1.0), (0.5, 0.0)])
def test_adversary_off_costs_nothing(weight, lam):
    model = CountingModel(tiny())
    discriminator = LanguageDiscriminator(64, 2)
    calls = []
    discriminator.register_forward_hook(lambda *args: calls.append(1))
    cfg = ObjectivesConfig(adversarial=AdversarialConfig(weight=weight, lambda_max=lam))
    batch = build_mono_batch(sentences(4), [0, 1, 0, 1], max_len=32)
    _, logs = total_loss(model, {"mlm": batch}, cfg, torch.Generator().manual_seed(0), discriminator=discriminator)
    assert calls == [] and model.asked_layers == [None]
    assert not any(key.startswith("adv") for key in logs)


def test_total_loss_is_the_weighted_sum():
    torch.manual_seed(0)
    model = XLMModel(tiny(n_languages=2, use_lang_emb=True))
    discriminator = LanguageDiscriminator(64, 2, hidden=16)
    cfg = ObjectivesConfig(mlm_weight=1.0, tlm_weight=0.5, clm_weight=0.25,
                           adversarial=AdversarialConfig(weight=0.1, lambda_max=1.0, warmup_steps=100, layer=1))
    batches = {
        "mlm": build_mono_batch(sentences(4), [0, 1, 0, 1], max_len=32),
        "tlm": build_tlm_batch(sentences(4, seed=1), sentences(4, seed=2), 0, 1, max_len=40),
        "clm": build_mono_batch(sentences(4, seed=3), [1, 1, 0, 0], max_len=32),
    }
    total, logs = total_loss(model, batches, cfg, torch.Generator().manual_seed(0), step=50,
                             discriminator=discriminator, language_names=["en", "fr"])
    expected = logs["mlm_loss"] + 0.5 * logs["tlm_loss"] + 0.25 * logs["clm_loss"] + 0.1 * logs["adv_loss"]
    assert total.item() == pytest.approx(expected, rel=1e-5) and logs["loss"] == pytest.approx(expected, rel=1e-5)
    assert logs["adv_lambda"] == 0.5 and {"adv_accuracy/en", "adv_accuracy/fr"} <= set(logs)
    total.backward()
    assert all(p.grad is not None for p in discriminator.parameters())
    # the mask is a function of the generator: the same seed gives the same MLM loss
    again, again_logs = total_loss(model, {"mlm": batches["mlm"]}, ObjectivesConfig(), torch.Generator().manual_seed(0))
    assert again_logs["mlm_loss"] == pytest.approx(logs["mlm_loss"], rel=1e-6)


def test_objectives_config_validation_and_round_trip():
    cfg = ObjectivesConfig(tlm_weight=1.0, masking=MaskingConfig(rate=0.2))
    assert ObjectivesConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="tlm_weight"):
        ObjectivesConfig(tlm_weight=-1.0)
    with pytest.raises(ValueError, match="nothing to train"):
        ObjectivesConfig(mlm_weight=0.0)
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['mlm'\]"):
        ObjectivesConfig.from_dict({"mlm": 1.0})
    with pytest.raises(ValueError, match="discriminator"):
        total_loss(XLMModel(tiny()), {"mlm": build_mono_batch(sentences(2), [0, 1], 32)},
                   ObjectivesConfig(adversarial=AdversarialConfig(weight=1.0)), torch.Generator())
    with pytest.raises(ValueError, match="unknown batch kind"):
        total_loss(XLMModel(tiny()), {"mono": {}}, ObjectivesConfig(), torch.Generator())
