"""Translation ranking (symmetric InfoNCE over in-batch negatives) and the adversary's separate strengths."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.unit.test_data import (LANGS, SEQ_LEN, assert_same_batch, loader_kwargs, shards,  # noqa: F401  (fixture)
                                  take)
from xlm_core.adversary import LanguageDiscriminator, masked_mean
from xlm_core.data import PretrainLoader
from xlm_core.masking import mask_tokens
from xlm_core.model import XLMModel
from xlm_core.model_config import ModelConfig
from xlm_core.objectives import build_dual_batch, build_mono_batch, total_loss, translation_ranking_loss
from xlm_core.settings import AdversarialConfig, ObjectivesConfig, TranslationRankingConfig
from xlm_core.special_tokens import BOS, EOS, PAD

VOCAB = 101


def tiny() -> ModelConfig:
    return ModelConfig.preset("tiny", vocab_size=VOCAB, dropout=0.0, attention_dropout=0.0)


def sentences(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, VOCAB - 1, (int(k),), generator=g).tolist()
            for k in torch.randint(3, 12, (n,), generator=g)]


def pooled(model: XLMModel, batch: dict, layer: int) -> torch.Tensor:
    hidden = model(batch["input_ids"], attention_mask=batch.get("attention_mask"), return_layer=layer).layer_hidden
    return F.normalize(masked_mean(hidden, batch.get("attention_mask")), dim=-1)


def test_dual_batch_layout_is_sources_then_targets():
    src, tgt = sentences(3, 0), sentences(3, 1)
    batch = build_dual_batch(src, tgt, 0, 2, max_len=8)
    assert batch["input_ids"].shape[0] == 6 and batch["lang_ids"].tolist() == [0, 0, 0, 2, 2, 2]
    for row, ids in zip(batch["input_ids"], src + tgt):
        n = min(len(ids), 6)
        assert row[0] == BOS and row[1:n + 1].tolist() == ids[:n] and row[n + 1] == EOS
        assert (row[n + 2:] == PAD).all()
    with pytest.raises(ValueError, match="need >= 2 pairs"):
        build_dual_batch(src[:1], tgt[:1], 0, 1, max_len=8)


@pytest.mark.parametrize("margin", [0.0, 0.3])
def test_loss_is_the_symmetric_infonce_of_the_pooled_cosines(margin):
    torch.manual_seed(0)
    model = XLMModel(tiny())
    cfg = TranslationRankingConfig(temperature=0.1, margin=margin, layer=1)
    batch = build_dual_batch(sentences(5, 0), sentences(5, 1), 0, 1, max_len=16)
    loss, logs = translation_ranking_loss(model, batch, cfg)
    vectors = pooled(model, batch, 1)
    sim = (vectors[:5] @ vectors[5:].T - margin * torch.eye(5)) / 0.1
    labels = torch.arange(5)
    expected = 0.5 * (F.cross_entropy(sim, labels) + F.cross_entropy(sim.T, labels))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert logs["tr_pairs"] == 5 and 0.0 <= logs["tr_accuracy"] <= 1.0


def test_gradient_pulls_translations_together_and_pushes_negatives_apart():
    """A few SGD steps on the loss alone: each planted pair's cosine rises relative to its negatives'."""
    torch.manual_seed(0)
    model = XLMModel(tiny())
    cfg = TranslationRankingConfig(temperature=0.1)
    batch = build_dual_batch(sentences(8, 0), sentences(8, 1), 0, 1, max_len=16)
    layer = cfg.layer_of(model.config.n_layers)
    with torch.no_grad():
        before = pooled(model, batch, layer)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss, _ = translation_ranking_loss(model, batch, cfg)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        after = pooled(model, batch, layer)
    sim_before, sim_after = before[:8] @ before[8:].T, after[:8] @ after[8:].T
    off = ~torch.eye(8, dtype=torch.bool)

    def gap(sim: torch.Tensor) -> torch.Tensor:   # true pair's cosine minus the mean of its row's negatives
        return sim.diagonal() - sim.masked_fill(~off, 0).sum(1) / 7

    assert (gap(sim_after) > gap(sim_before)).all()
    assert losses[-1] < losses[0]


def test_tr_enters_total_loss_and_settings_refuse_bad_values():
    torch.manual_seed(0)
    model = XLMModel(tiny())
    cfg = ObjectivesConfig(tr_weight=0.5, translation_ranking=TranslationRankingConfig(layer=2))
    batch = build_dual_batch(sentences(4, 0), sentences(4, 1), 0, 1, max_len=16)
    total, logs = total_loss(model, {"tr": batch}, cfg, torch.Generator().manual_seed(0))
    assert total.item() == pytest.approx(0.5 * logs["tr_loss"], rel=1e-6)
    scaled = ObjectivesConfig(tr_weight=0.5, translation_ranking=TranslationRankingConfig(layer=2, loss_weight=0.2))
    total, logs = total_loss(model, {"tr": batch}, scaled, torch.Generator().manual_seed(0))
    assert total.item() == pytest.approx(0.1 * logs["tr_loss"], rel=1e-6)
    assert ObjectivesConfig.from_dict(cfg.to_dict()) == cfg
    for bad in ({"pairs": 1}, {"temperature": 0.0}, {"margin": 1.0}, {"layer": -1}, {"max_len": 2},
                {"loss_weight": 0.0}, {"loss_weight": float("nan")}):
        with pytest.raises(ValueError, match="TranslationRankingConfig"):
            TranslationRankingConfig(**bad)
    with pytest.raises(ValueError, match="has 2 layers"):
        TranslationRankingConfig(layer=3).layer_of(2)


# ------------------------------------------------------------------------------------------------------ adversary
def _grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("weight, lambda_max, step, warmup", [(0.05, 0.1, 500, 200), (0.5, 2.0, 50, 100)])
def test_adversary_strengths_are_separate(weight, lambda_max, step, warmup):
    """The discriminator learns from weight × its loss; the encoder gets -λ(step) × the loss's gradient, not -weight·λ."""
    torch.manual_seed(0)
    model = XLMModel(tiny())
    discriminator = LanguageDiscriminator(64, 3, hidden=32)
    adv = AdversarialConfig(weight=weight, lambda_max=lambda_max, warmup_steps=warmup, layer=1)
    batch = build_mono_batch(sentences(6, 0), [0, 1, 2, 0, 1, 2], max_len=32)
    strength = lambda_max * min(1.0, step / warmup)

    def run(cfg: ObjectivesConfig):
        model.zero_grad(set_to_none=True)
        discriminator.zero_grad(set_to_none=True)
        total, logs = total_loss(model, {"mlm": batch}, cfg, torch.Generator().manual_seed(3), step=step,
                                 discriminator=discriminator)
        total.backward()
        return _grads(model), _grads(discriminator), logs

    with_adv, disc_grads, logs = run(ObjectivesConfig(adversarial=adv))
    without, _, _ = run(ObjectivesConfig())
    assert logs["adv_lambda"] == pytest.approx(strength)
    # the plain gradient of the discriminator's loss (no reversal, weight 1) on the masked input the MLM forward saw
    model.zero_grad(set_to_none=True)
    discriminator.zero_grad(set_to_none=True)
    masked = mask_tokens(batch["input_ids"], VOCAB, ObjectivesConfig().masking, torch.Generator().manual_seed(3))
    hidden = model(masked.input_ids, attention_mask=batch["attention_mask"], return_layer=1).layer_hidden
    F.cross_entropy(discriminator(masked_mean(hidden, batch["attention_mask"])), batch["lang_ids"]).backward()
    plain_encoder, plain_disc = _grads(model), _grads(discriminator)
    for name, grad in plain_encoder.items():
        torch.testing.assert_close(with_adv[name] - without[name], -strength * grad, atol=1e-6, rtol=1e-4)
    for name, grad in plain_disc.items():
        torch.testing.assert_close(disc_grads[name], weight * grad, atol=1e-7, rtol=1e-5)


# ------------------------------------------------------------------------------------------------------- loader
def test_loader_makes_translation_ranking_steps_from_the_pairs(shards):  # noqa: F811
    kwargs = loader_kwargs(shards, objectives={"mlm": 1.0, "tr": 1.0}, accum_steps=2, tr_pairs=12, tr_max_len=10)
    seen = 0
    with PretrainLoader(**kwargs) as loader:
        for micro in take(loader, 30):
            if micro[0].objective != "tr":
                continue
            seen += 1
            assert len(micro) == 2
            for b in micro:
                a, c = (LANGS.index(x) for x in b.key.split("-"))
                assert b.input_ids.shape[0] == 12 and b.input_ids.shape[1] <= 10 and b.position_ids is None
                assert (b.lang_ids[:6] == a).all() and (b.lang_ids[6:][b.input_ids[6:] != PAD] == c).all()
                assert (b.input_ids[:, 0] == BOS).all()
    assert seen > 5
    with pytest.raises(Exception, match="translation_ranking.pairs = 3"):
        PretrainLoader(**loader_kwargs(shards, objectives={"tr": 1.0}, accum_steps=2, tr_pairs=3))


@pytest.mark.parametrize("mode", ["stream", "sentence"])
def test_resume_with_tlm_and_tr_on_one_pair_stream_is_exact(shards, mode):  # noqa: F811
    # tr steps read pairs straight from the stream that TLM's sentence-mode pool fills from: a restore that rebuilt
    # the pool and left the stream at the pool's end replayed the pairs the tr steps had already taken
    extra = {"mode": mode, "token_budget": 4 * SEQ_LEN, "pool_sentences": 40} if mode == "sentence" else {}
    kwargs = loader_kwargs(shards, objectives={"mlm": 0.5, "tlm": 1.0, "tr": 1.0}, tr_pairs=12, tr_max_len=10,
                           **extra)
    k, n = 12, 24
    with PretrainLoader(**kwargs) as whole:
        before = take(whole, k)
        state = whole.state_dict()
        after = take(whole, n)
    with PretrainLoader(**{**kwargs, "prefetch": 0}) as resumed:
        resumed.load_state_dict(state)
        again = take(resumed, n)
    for got, want in zip(again, after):
        assert len(got) == len(want)
        for a, b in zip(got, want):
            assert_same_batch(a, b)
    # meaningful: tr steps ran before the state was taken and after it, and so did tlm
    assert {"tlm", "tr"} <= {micro[0].objective for micro in before}
    assert {"tlm", "tr"} <= {micro[0].objective for micro in after}
