"""The cross-lingual encoder: XLM-R's architecture, read top to bottom.

    token embedding + position embedding (+ language embedding)  ->  LayerNorm  ->  dropout
    n_layers x Block:  x = LN(x + drop(Attention(x)));  x = LN(x + drop(FFN(x)))      (post-LN, as XLM-R)
    MLM head:          dense -> GELU -> LayerNorm -> decoder tied to the token embedding, plus a bias

The module computes hidden states; the MLM head is applied only where the caller asks (``target_index``), so a
training step never builds the [batch, time, vocab] tensor (most of the work of a full-vocabulary head; see
shared/notes/performance-facts.md). Weights map one-to-one onto Hugging Face's XLMRobertaForMaskedLM through
``xlm_core.hf``; positions here are 0-based for the first real token (the adapter adds HF's padding_idx + 1 offset).

The model knows nothing of data parallelism, compilation or the pipeline: those are applied from outside.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from xlm_core.model_config import ModelConfig


# ----------------------------------------------------------------------------------------------------------- layers
def sinusoidal_table(n_positions: int, d_model: int) -> torch.Tensor:
    """Vaswani et al.'s fixed positions: sin on even dims, cos on odd dims, wavelengths up to 10000·2π."""
    position = torch.arange(n_positions, dtype=torch.float32)[:, None]
    inv_freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    table = torch.zeros(n_positions, d_model)
    table[:, 0::2] = torch.sin(position * inv_freq)
    table[:, 1::2] = torch.cos(position * inv_freq)[:, : d_model // 2]
    return table


def fixed_position_table(cfg: ModelConfig) -> torch.Tensor:
    """The sinusoidal table this model adds, scaled to the token embeddings' init (per-dim RMS = init_std).

    Unscaled, its entries (RMS 0.71) would be ~35x the N(0, 0.02) token vectors, and the embedding LayerNorm would
    wash token identity out of the sum; Vaswani et al. balance the two by scaling tokens up by sqrt(d) instead.
    """
    return sinusoidal_table(cfg.max_positions, cfg.d_model) * (cfg.init_std * math.sqrt(2.0))


class SelfAttention(nn.Module):
    """Multi-head self-attention with one fused QKV projection and PyTorch's scaled_dot_product_attention."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.head_dim
        self.dropout_p = cfg.attention_dropout
        # Output rows are [q; k; v], each head-major (head h owns rows h*head_dim ... ): HF's query/key/value layout.
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor], is_causal: bool) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal,
            dropout_p=self.dropout_p if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.fc_in = nn.Linear(cfg.d_model, cfg.d_ff)
        self.fc_out = nn.Linear(cfg.d_ff, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(F.gelu(self.fc_in(x)))  # exact (erf) GELU, as XLM-R


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.pre_ln = cfg.pre_ln
        self.attn = SelfAttention(cfg)
        self.attn_ln = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.ffn = FeedForward(cfg)
        self.ffn_ln = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor], is_causal: bool) -> torch.Tensor:
        if self.pre_ln:
            x = x + self.drop(self.attn(self.attn_ln(x), attn_mask, is_causal))
            return x + self.drop(self.ffn(self.ffn_ln(x)))
        x = self.attn_ln(x + self.drop(self.attn(x, attn_mask, is_causal)))
        return self.ffn_ln(x + self.drop(self.ffn(x)))


class MLMHead(nn.Module):
    """dense -> GELU -> LayerNorm; the vocabulary projection reuses the token embedding (tied) plus this bias."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, hidden: torch.Tensor, token_embedding: torch.Tensor) -> torch.Tensor:
        return F.linear(self.ln(F.gelu(self.dense(hidden))), token_embedding, self.bias)


class ModelOutput(NamedTuple):
    hidden: torch.Tensor                      # [B, T, d] last layer
    logits: Optional[torch.Tensor]            # [N, vocab] at target_index, when asked
    layer_hidden: Optional[torch.Tensor]      # [B, T, d] after layer `return_layer`, when asked


class FlopsPerToken(NamedTuple):
    model: float       # 6·N: the usual MFU numerator (every parameter, full vocabulary head at every token)
    hardware: float    # the work actually done: encoder 6·N, head only at projected positions, attention 12·L·T·d


# ------------------------------------------------------------------------------------------------------------ model
class XLMModel(nn.Module):
    """XLM-R-compatible encoder with a tied MLM head (also a causal LM when asked for causal attention)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model, padding_idx=cfg.pad_id)
        if cfg.positions == "learned":
            self.pos_emb: Optional[nn.Embedding] = nn.Embedding(cfg.max_positions, cfg.d_model)
        else:
            self.pos_emb = None
            # Not persistent: it is a function of the config, so checkpoints do not carry it.
            self.register_buffer("pos_table", fixed_position_table(cfg), persistent=False)
        self.lang_emb = nn.Embedding(cfg.n_languages, cfg.d_model) if cfg.use_lang_emb else None
        self.emb_ln = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.emb_drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.final_ln = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps) if cfg.pre_ln else None
        self.mlm_head = MLMHead(cfg)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        """BERT / XLM-R init: N(0, 0.02) weights, zero biases, LayerNorm = identity, a zero padding embedding."""
        std = self.config.init_std
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, MLMHead):
            nn.init.zeros_(module.bias)

    # ---------------------------------------------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: torch.Tensor,
        lang_ids: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        causal: Optional[bool] = None,
        target_index: Optional[torch.Tensor] = None,
        return_layer: Optional[int] = None,
        stop_at_layer: bool = False,
    ) -> ModelOutput:
        """Encode a right-padded batch.

        input_ids [B, T]; lang_ids [B] (one language per sequence) or [B, T]; position_ids [B, T], 0-based (default
        0..T-1; TLM restarts them at the second segment); attention_mask [B, T], true/1 at real tokens (default: the
        tokens that are not pad_id; no mask at all when nothing is padded). causal overrides config.causal.
        target_index: flat indices into B*T where the MLM head is applied -> logits [N, vocab].
        return_layer k: also return the hidden states after block k (0 = embeddings, negative counts from the end).
        stop_at_layer: run no block above return_layer (a pooled embedding of a lower layer then costs only the blocks
        below it); hidden is that layer's too, and there are no logits.
        """
        cfg = self.config
        is_causal = cfg.causal if causal is None else causal
        if return_layer is not None:
            if not -(cfg.n_layers + 1) <= return_layer <= cfg.n_layers:
                raise ValueError(f"return_layer = {return_layer}: this model has layers 0..{cfg.n_layers}")
            return_layer %= cfg.n_layers + 1
        stop = return_layer if stop_at_layer and return_layer is not None and return_layer < cfg.n_layers else None
        if stop is not None and target_index is not None:
            raise ValueError("stop_at_layer skips the MLM head: do not pass target_index with it")

        x = self.embed(input_ids, lang_ids, position_ids)
        if stop == 0:
            return ModelOutput(hidden=x, logits=None, layer_hidden=x)
        attn_mask, sdpa_causal = self._attention_mask(input_ids, attention_mask, is_causal)
        layer_hidden = x if return_layer == 0 else None
        for i, block in enumerate(self.blocks, start=1):
            x = block(x, attn_mask, sdpa_causal)
            if i == return_layer:
                layer_hidden = x
            if i == stop:
                return ModelOutput(hidden=x, logits=None, layer_hidden=x)
        if self.final_ln is not None:
            x = self.final_ln(x)
            if return_layer == cfg.n_layers:
                layer_hidden = x
        logits = self.mlm_logits(x, target_index) if target_index is not None else None
        return ModelOutput(hidden=x, logits=logits, layer_hidden=layer_hidden)

    def embed(self, input_ids: torch.Tensor, lang_ids: Optional[torch.Tensor] = None,
              position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        cfg = self.config
        T = input_ids.shape[1]
        table = self.pos_emb.weight if self.pos_emb is not None else self.pos_table
        if position_ids is None:
            if T > cfg.max_positions:
                raise ValueError(f"sequence length {T} exceeds max_positions = {cfg.max_positions}; truncate it")
            pos = table[:T]  # shared by the whole batch: a slice, broadcast, instead of a per-token lookup
        else:  # explicit (TLM restarts them, so T itself may exceed max_positions)
            pos = F.embedding(position_ids, table)
        x = self.tok_emb(input_ids) + pos
        if self.lang_emb is not None:
            if lang_ids is None:
                raise ValueError("this model has language embeddings (use_lang_emb=True): pass lang_ids")
            lang = self.lang_emb(lang_ids)
            x = x + (lang[:, None, :] if lang_ids.dim() == 1 else lang)
        return self.emb_drop(self.emb_ln(x))

    def _attention_mask(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                        is_causal: bool) -> tuple[Optional[torch.Tensor], bool]:
        """(boolean SDPA mask [B, 1, T|1, T] or None, is_causal flag for SDPA).

        Without padding there is no mask tensor at all, which keeps SDPA on its fastest kernel.
        """
        if attention_mask is None:
            attention_mask = input_ids != self.config.pad_id
            # Data-dependent shortcut; under torch.compile keep the mask instead of breaking the graph.
            if not torch.compiler.is_compiling() and bool(attention_mask.all()):
                return None, is_causal
        keep = attention_mask.bool()[:, None, None, :]
        if is_causal:  # SDPA takes a mask or is_causal, not both: fold the triangle into the mask
            T = input_ids.shape[1]
            keep = keep & torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril()
        return keep, False

    def mlm_logits(self, hidden: torch.Tensor, target_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Vocabulary logits: [N, vocab] at flat indices `target_index` into B*T, or [B, T, vocab] for all."""
        if target_index is not None:
            hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, target_index)
        return self.mlm_head(hidden, self.tok_emb.weight)

    # ---------------------------------------------------------------------------------------------- bookkeeping
    def optimizer_param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """AdamW groups: decay the Linear weights only; never biases, LayerNorms or embeddings (BERT practice)."""
        decay, no_decay = [], []
        for module in self.modules():
            for name, param in module.named_parameters(recurse=False):
                if not param.requires_grad:
                    continue
                (decay if isinstance(module, nn.Linear) and name == "weight" else no_decay).append(param)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count (the tied decoder counted once); non_embedding drops the token/position/language tables."""
        total = sum(p.numel() for p in self.parameters())
        if non_embedding:
            total -= sum(m.weight.numel() for m in (self.tok_emb, self.pos_emb, self.lang_emb) if m is not None)
        return total

    def flops_per_token(self, seq_len: int, projected_fraction: float = 1.0) -> FlopsPerToken:
        """Training FLOPs per token (forward + backward = 3 × forward = 6 per multiply-add per parameter).

        `hardware` counts the vocabulary head (dense + LayerNorm + tied decoder + bias) only at the fraction of
        positions it is applied to (0.15 for gathered MLM), plus attention's 12·L·T·d (QKᵀ and AV, fwd + bwd).
        """
        cfg = self.config
        head = sum(p.numel() for p in self.mlm_head.parameters()) + cfg.vocab_size * cfg.d_model
        encoder = self.num_params(non_embedding=True) - sum(p.numel() for p in self.mlm_head.parameters())
        attention = 12 * cfg.n_layers * seq_len * cfg.d_model
        return FlopsPerToken(
            model=6.0 * self.num_params(non_embedding=False),
            hardware=6.0 * encoder + 6.0 * head * projected_fraction + attention,
        )

    def estimate_mfu(self, tokens_per_s: float, peak_flops: float, seq_len: Optional[int] = None,
                     projected_fraction: float = 0.15) -> dict[str, float]:
        """Model and hardware FLOPs utilisation of a training run at `tokens_per_s` on hardware of `peak_flops`."""
        flops = self.flops_per_token(seq_len or self.config.max_positions, projected_fraction)
        return {"mfu": tokens_per_s * flops.model / peak_flops, "hfu": tokens_per_s * flops.hardware / peak_flops}
