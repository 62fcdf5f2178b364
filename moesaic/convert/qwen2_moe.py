"""Qwen2-MoE checkpoints <-> ``MoELM``: export to, and import from, the Hugging Face format.

The exported directory holds ``config.json`` and ``model.safetensors`` in the layout Qwen1.5-MoE
and Qwen2-MoE are published in (``model.layers.{i}.mlp.experts.{j}.gate_proj.weight`` ...), which
``transformers.Qwen2MoeForCausalLM.from_pretrained`` loads. Import reads that layout or the fused
one transformers >= 5 keeps in memory (``mlp.experts.gate_up_proj`` (E, 2F, D), ``down_proj``
(E, D, F)), from a directory or from a model object. Neither direction imports transformers.

Qwen2-MoE is Mixtral's architecture (``moesaic.convert.hf`` holds what they share) plus:

- a shared expert in every sparse layer, scaled per token by a sigmoid gate:
  ``y = routed(x) + sigmoid(x W_sg) * shared(x)``: ``MoEConfig(shared_d_ff=F_s,
  shared_gate=True)``;
- biases on the query, key and value projections: ``LMConfig(qkv_bias=True)``;
- a top-k softmax router that keeps the k raw probabilities (``norm_topk_prob=False`` in the
  released models): ``router_options={"normalize": False}``;
- dense SwiGLU layers where ``decoder_sparse_step`` and ``mlp_only_layers`` put no experts:
  ``LMConfig.moe_every`` and ``first_dense_layers`` (``mlp_only_layers = [0, ..., n - 1]``);
  the dense layers are ``intermediate_size`` wide (``LMConfig.d_ff``), the experts
  ``moe_intermediate_size`` (``LMConfig.expert_d_ff`` when it differs).

Import names every config field moesaic cannot represent (another layer pattern, sliding-window
attention, another rotary type); export every ``LMConfig`` field Qwen2-MoE cannot.

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
    hf_config,
    hf_state,
    import_checkpoint,
    lm_fields,
    moesaic_state,
    split_experts,
    stack_experts,
    unfuse_experts,
)
from moesaic.layer import MoE
from moesaic.models.lm import LMConfig, MoELM

__all__ = ["export_qwen2_moe", "import_qwen2_moe", "qwen2_moe_config", "lm_config_from_qwen2_moe"]

FAMILY = "Qwen2-MoE"
NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}  # ours: Qwen2-MoE's


def _rules(cfg: LMConfig, need: Need) -> None:
    moe = cfg.moe
    need(moe.shared_d_ff > 0, "moe.shared_d_ff", moe.shared_d_ff, "Qwen2-MoE has a shared expert")
    need(moe.shared_gate, "moe.shared_gate", moe.shared_gate, "Qwen2-MoE gates its shared expert")
    need(not moe.jitter, "moe.jitter", moe.jitter, "Qwen2-MoE's router has no jitter: None or 0")


def qwen2_moe_config(cfg: LMConfig) -> dict[str, Any]:
    """The ``config.json`` of ``cfg`` as a Qwen2-MoE model (checked by ``export_qwen2_moe``)."""
    moe = cfg.moe
    return hf_config(cfg, "Qwen2MoeForCausalLM", "qwen2_moe") | {
        "intermediate_size": cfg.d_ff,  # the dense layers' width
        "moe_intermediate_size": cfg.expert_width,
        "shared_expert_intermediate_size": moe.shared_d_ff,
        "num_experts": moe.num_experts,
        "norm_topk_prob": moe.router_options.get("normalize", True),
        "decoder_sparse_step": cfg.moe_every,
        "mlp_only_layers": list(range(cfg.first_dense_layers)),
        "qkv_bias": cfg.qkv_bias,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": cfg.n_layers,
    }


def export_qwen2_moe(model: MoELM, out_dir: str | Path) -> Path:
    """Write ``model`` as a Qwen2-MoE checkpoint (config.json + model.safetensors) in
    ``out_dir``.

    Raises ValueError naming every ``model.*`` field Qwen2-MoE cannot represent.

    Example::

        >>> export_qwen2_moe(model, "out/qwen2-moe")
        >>> hf = transformers.Qwen2MoeForCausalLM.from_pretrained("out/qwen2-moe")
    """
    return export_checkpoint(model, out_dir, FAMILY, _rules, qwen2_moe_config, _hf_state)


def _hf_state(model: MoELM) -> dict[str, torch.Tensor]:
    def ffn(p: str, layer: nn.Module) -> dict[str, torch.Tensor]:
        if not isinstance(layer, MoE):  # DenseFFN: nn.Linear w1, w2, w3
            return {
                f"{p}mlp.{theirs}.weight": getattr(layer, ours).weight
                for ours, theirs in NAMES.items()
            }
        q = p + "mlp."
        shared = {
            f"{q}shared_expert.{theirs}.weight": getattr(layer.shared, ours)[0].t()
            for ours, theirs in NAMES.items()
        }
        return {
            q + "gate.weight": layer.router.gate.weight,
            q + "shared_expert_gate.weight": layer.shared_gate.weight,
            **shared,
            **split_experts(layer.experts, q + "experts.", NAMES),
        }

    return hf_state(model, ffn)


def _sparse_layers(c: dict[str, Any]) -> list[int]:
    """Qwen2MoeDecoderLayer's rule: which layers hold experts."""
    if not c.get("num_experts"):
        return []
    step, dense = c.get("decoder_sparse_step", 1), set(c.get("mlp_only_layers") or ())
    return [i for i in range(c["num_hidden_layers"]) if i not in dense and (i + 1) % step == 0]


def _placement(c: dict[str, Any], sparse: list[int], seq: int, wrong: list[str]) -> tuple[int, int]:
    """``(moe_every, first_dense_layers)`` for the ``sparse`` layers of ``c``; appends to
    ``wrong`` what does not map."""
    n = c["num_hidden_layers"]
    layout = (
        f"num_experts={c.get('num_experts')}, decoder_sparse_step={c.get('decoder_sparse_step', 1)}"
        f", mlp_only_layers={list(c.get('mlp_only_layers') or [])}"
    )
    if not sparse:
        wrong.append(f"{layout} leave no sparse layer (moesaic's MoELM needs experts)")
        return 1, 0
    every = c.get("decoder_sparse_step", 1)
    # moesaic's rule: layer i is sparse when (i + 1) % moe_every == 0 and i >= first_dense_layers
    first = [f for f in range(n) if sparse == [i for i in range(f, n) if (i + 1) % every == 0]]
    if not first:
        wrong.append(
            f"{layout} make layers {sparse} sparse: moesaic puts experts in every moe_every-th "
            "layer from first_dense_layers on (layer i when (i + 1) % moe_every == 0 and "
            "i >= first_dense_layers)"
        )
    sliding = c.get("use_sliding_window") or "sliding_attention" in (c.get("layer_types") or [])
    window = c.get("sliding_window")
    if sliding and window is not None and window < seq:
        wrong.append(
            f"use_sliding_window=True with sliding_window={window} < max_seq_len={seq} "
            "(moesaic attends to the whole context)"
        )
    return every, (first[0] if first else 0)


def lm_config_from_qwen2_moe(config: Any, max_seq_len: int | None = None) -> LMConfig:
    """The ``LMConfig`` of a Qwen2-MoE config (a dict or a transformers ``Qwen2MoeConfig``).

    ``max_seq_len`` overrides ``max_position_embeddings`` (rotary tables are precomputed for it).
    Raises ValueError naming every field moesaic cannot represent."""
    c = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    wrong: list[str] = []
    fields = lm_fields(c, max_seq_len, 1e-6, wrong)
    sparse = _sparse_layers(c)
    every, first_dense = _placement(c, sparse, fields["max_seq_len"], wrong)
    if wrong:
        raise ValueError("cannot import this Qwen2-MoE config:\n  " + "\n  ".join(wrong))
    top_k = c["num_experts_per_tok"]
    expert_width = c["moe_intermediate_size"]
    dense_width = c.get("intermediate_size") or expert_width
    has_dense = len(sparse) < c["num_hidden_layers"]
    coef = float(c.get("router_aux_loss_coef", 0.001))
    return LMConfig(
        **fields,
        qkv_bias=bool(c.get("qkv_bias", True)),  # the released configs predate the field: True
        d_ff=dense_width if has_dense else expert_width,
        expert_d_ff=expert_width if has_dense and dense_width != expert_width else None,
        moe=MoEConfig(
            num_experts=c["num_experts"],
            top_k=top_k,
            router="topk",
            router_options={} if c.get("norm_topk_prob", False) else {"normalize": False},
            shared_d_ff=c["shared_expert_intermediate_size"],
            shared_gate=True,
            aux_loss_weight=aux_weight_from_hf(coef, len(sparse), top_k),
        ),
        moe_every=every,
        first_dense_layers=first_dense,
    )


def import_qwen2_moe(source: Any, max_seq_len: int | None = None) -> MoELM:
    """A ``MoELM`` equal to a Qwen2-MoE model: ``source`` is a directory (config.json and
    safetensors, one file or shards) or a transformers ``Qwen2MoeForCausalLM``."""
    return import_checkpoint(source, FAMILY, lm_config_from_qwen2_moe, _moesaic_state, max_seq_len)


def _moesaic_state(cfg: LMConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    sd = unfuse_experts(sd, NAMES)

    def ffn(p: str, b: str, i: int) -> dict[str, torch.Tensor]:
        q = p + "mlp."
        if not cfg.moe_layer(i):
            return {
                f"{b}ffn.{ours}.weight": sd[f"{q}{theirs}.weight"] for ours, theirs in NAMES.items()
            }
        experts = stack_experts(sd, q + "experts.", NAMES, cfg.moe.num_experts)
        shared = {
            f"{b}ffn.shared.{ours}": sd[f"{q}shared_expert.{theirs}.weight"].t()[None]
            for ours, theirs in NAMES.items()
        }
        return {
            b + "ffn.router.gate.weight": sd[q + "gate.weight"],
            b + "ffn.shared_gate.weight": sd[q + "shared_expert_gate.weight"],
            **shared,
            **{f"{b}ffn.experts.{name}": w for name, w in experts.items()},
        }

    return moesaic_state(cfg, sd, ffn)
