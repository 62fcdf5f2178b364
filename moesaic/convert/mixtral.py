"""Mixtral checkpoints <-> ``MoELM``: export to, and import from, the Hugging Face format.

The exported directory holds ``config.json`` and ``model.safetensors`` in the layout Mixtral is
published in (``model.layers.{i}.block_sparse_moe.experts.{j}.w1.weight`` ...), which
``transformers.MixtralForCausalLM.from_pretrained`` loads. Import reads that layout or the fused one
transformers >= 5 keeps in memory (``mlp.experts.gate_up_proj`` (E, 2F, D), ``down_proj``
(E, D, F)), from a directory or from a model object. Neither direction imports transformers.

The two models agree exactly where their architectures map; ``export_mixtral`` names every
``LMConfig`` field that does not (Mixtral has RMSNorm, SwiGLU experts, rotary positions, an MoE
in every layer and a top-k softmax router renormalised over the k chosen experts, without
capacity). What Mixtral shares with Qwen2-MoE (attention, norms, the rotary relabelling, the
balancing-loss coefficient, reading and writing directories) lives in ``moesaic.convert.hf``.

Shape legend (docs/shapes.md): D model dim, F expert hidden, E experts, V vocabulary.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from moesaic.config import MoEConfig
from moesaic.convert.hf import (
    Need,
    aux_weight_from_hf,
    export_checkpoint,
    hf_aux_coef,
    hf_config,
    hf_state,
    import_checkpoint,
    lm_fields,
    moesaic_state,
    split_experts,
    stack_experts,
    unfuse_experts,
)
from moesaic.models.lm import LMConfig, MoELM

__all__ = [
    "export_mixtral",
    "import_mixtral",
    "mixtral_config",
    "lm_config_from_mixtral",
    "hf_aux_coef",
    "aux_weight_from_hf",
]

FAMILY = "Mixtral"
EXPERT_NAMES = {"w1": "w1", "w2": "w2", "w3": "w3"}  # ours: Mixtral's (the same names)


def _rules(cfg: LMConfig, need: Need) -> None:
    moe = cfg.moe
    need(cfg.moe_every == 1, "moe_every", cfg.moe_every, "Mixtral has an MoE in every layer: 1")
    need(not cfg.qkv_bias, "qkv_bias", cfg.qkv_bias, "Mixtral's attention has no biases")
    fd = cfg.first_dense_layers
    need(fd == 0, "first_dense_layers", fd, "Mixtral has an MoE in every layer: 0")
    need(cfg.expert_d_ff in (None, cfg.d_ff), "expert_d_ff", cfg.expert_d_ff, "Mixtral: None")
    normalize = moe.router_options.get("normalize", True)
    need(normalize is True, "moe.router_options['normalize']", normalize, "Mixtral renormalises")
    need(moe.shared_d_ff == 0, "moe.shared_d_ff", moe.shared_d_ff, "Mixtral has no shared expert")


def mixtral_config(cfg: LMConfig) -> dict[str, Any]:
    """The ``config.json`` of ``cfg`` as a Mixtral model (checked by ``export_mixtral``)."""
    return hf_config(cfg, "MixtralForCausalLM", "mixtral") | {
        "intermediate_size": cfg.d_ff,
        "head_dim": cfg.d_model // cfg.n_heads,
        "sliding_window": None,
        "num_local_experts": cfg.moe.num_experts,
        "router_jitter_noise": cfg.moe.jitter or 0.0,  # both: x * U(1 - eps, 1 + eps) in training
    }


def export_mixtral(model: MoELM, out_dir: str | Path) -> Path:
    """Write ``model`` as a Mixtral checkpoint (config.json + model.safetensors) in ``out_dir``.

    Raises ValueError naming every ``model.*`` field Mixtral cannot represent.

    Example::

        >>> export_mixtral(model, "out/mixtral")
        >>> hf = transformers.MixtralForCausalLM.from_pretrained("out/mixtral")
    """
    return export_checkpoint(model, out_dir, FAMILY, _rules, mixtral_config, _hf_state)


def _hf_state(model: MoELM) -> dict[str, torch.Tensor]:
    def ffn(p: str, moe: nn.Module) -> dict[str, torch.Tensor]:
        experts = split_experts(moe.experts, p + "block_sparse_moe.experts.", EXPERT_NAMES)
        return {p + "block_sparse_moe.gate.weight": moe.router.gate.weight, **experts}

    return hf_state(model, ffn)


def lm_config_from_mixtral(config: Any, max_seq_len: int | None = None) -> LMConfig:
    """The ``LMConfig`` of a Mixtral config (a dict or a transformers ``MixtralConfig``).

    ``max_seq_len`` overrides ``max_position_embeddings`` (rotary tables are precomputed for it).
    Raises ValueError naming every field moesaic cannot represent."""
    c = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    wrong: list[str] = []
    fields = lm_fields(c, max_seq_len, 1e-5, wrong)
    window, seq = c.get("sliding_window"), fields["max_seq_len"]
    if window is not None and window < seq:
        wrong.append(f"sliding_window={window} must be None or >= max_seq_len={seq}")
    if wrong:
        raise ValueError("cannot import this Mixtral config:\n  " + "\n  ".join(wrong))
    return LMConfig(
        **fields,
        d_ff=c["intermediate_size"],
        moe=MoEConfig(
            num_experts=c["num_local_experts"],
            top_k=c["num_experts_per_tok"],
            router="topk",
            aux_loss_weight=aux_weight_from_hf(
                float(c.get("router_aux_loss_coef", 0.001)),
                c["num_hidden_layers"],
                c["num_experts_per_tok"],
            ),
            jitter=float(c.get("router_jitter_noise") or 0.0) or None,  # None: topk's 0
        ),
        moe_every=1,
    )


def import_mixtral(source: Any, max_seq_len: int | None = None) -> MoELM:
    """A ``MoELM`` equal to a Mixtral model: ``source`` is a directory (config.json and
    safetensors, one file or shards) or a transformers ``MixtralForCausalLM``."""
    return import_checkpoint(source, FAMILY, lm_config_from_mixtral, _moesaic_state, max_seq_len)


def _moesaic_state(cfg: LMConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # transformers >= 5 keeps Mixtral's FFN under "mlp" in memory, "block_sparse_moe" on disk
    sd = {
        k.replace(".mlp.", ".block_sparse_moe."): v
        for k, v in unfuse_experts(sd, EXPERT_NAMES).items()
    }

    def ffn(p: str, b: str, i: int) -> dict[str, torch.Tensor]:
        q = p + "block_sparse_moe."
        experts = stack_experts(sd, q + "experts.", EXPERT_NAMES, cfg.moe.num_experts)
        out = {b + "ffn.router.gate.weight": sd[q + "gate.weight"]}
        return out | {b + f"ffn.experts.{name}": w for name, w in experts.items()}

    return moesaic_state(cfg, sd, ffn)
