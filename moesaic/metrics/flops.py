"""Analytic FLOPs per token of ``MoELM`` (matmul FLOPs; norms and activations are negligible).

Forward, per token and layer: attention projections ``2 * (2 * D^2 + 2 * D * Dkv)`` (query and
output ``D x D``, key and value ``D x Dkv``, ``Dkv = n_kv_heads * head_dim``: ``D`` without
grouped-query attention, so ``2 * 4 * D^2``), attention scores and
weighted values ``2 * 2 * S * D`` (the full S x S product that ``scaled_dot_product_attention``
computes), the FFN ``2 * n_mats * D * F`` times k experts for an MoE layer (n_mats 2, or 3 for
swiglu; F the expert width ``LMConfig.expert_width``), its shared expert ``2 * n_mats * D *
shared_d_ff`` and the shared expert's gate ``2 * D``, the router ``2 * D * E``; plus the output
head ``2 * D * V``. A training step costs three
forwards (backward is twice the forward's matmuls).
"""

from __future__ import annotations

import dataclasses

from moesaic.models.lm import LMConfig

__all__ = ["FlopsPerToken", "lm_flops_per_token"]


@dataclasses.dataclass(frozen=True)
class FlopsPerToken:
    forward: float
    train: float


def lm_flops_per_token(cfg: LMConfig, seq_len: int) -> FlopsPerToken:
    D, S = cfg.d_model, seq_len
    D_kv = cfg.kv_heads * (D // cfg.n_heads)
    mats = 3 if cfg.activation == "swiglu" else 2
    forward = 2.0 * D * cfg.vocab_size
    for i in range(cfg.n_layers):
        forward += 2 * (2 * D * D + 2 * D * D_kv) + 2 * 2 * S * D
        F = cfg.ffn_width(i)
        if cfg.moe_layer(i):
            moe = cfg.moe
            forward += moe.experts_per_token * 2 * mats * D * F + 2 * D * cfg.layer_experts(i)
            forward += 2 * mats * D * moe.shared_d_ff + 2 * D * moe.shared_gate
            forward += 2 * D * 2 * moe.residual_coefficient  # DeepSpeed-MoE's residual mix
        else:
            forward += 2 * mats * D * F
    return FlopsPerToken(forward=forward, train=3 * forward)
