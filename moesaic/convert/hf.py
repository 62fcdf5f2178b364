"""What the Hugging Face checkpoint converters share (``mixtral``, ``qwen2_moe``).

Both families are Llama-style decoders: RMSNorm, rotary positions, (grouped-query) attention with
``q_proj``/``k_proj``/``v_proj``/``o_proj``, SwiGLU experts behind a top-k softmax router. This
module maps those shared parts both ways, converts the balancing-loss coefficient, and reads and
writes checkpoint directories (``config.json`` + safetensors); a family module adds its FFN
layout and its config fields. Nothing here imports transformers.

One difference is only a relabelling: our rotary embedding turns channel pairs (2i, 2i+1) of a
head, Hugging Face's turns (i, i + hd/2); permuting the rows of the query and key projections (and
their biases) the same way inside each head maps one onto the other, and leaves every attention
score unchanged.

Shape legend (docs/shapes.md): D model dim, F expert hidden, E experts, V vocabulary.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from moesaic.models.lm import LMConfig, MoELM

__all__ = ["hf_aux_coef", "aux_weight_from_hf"]

WEIGHTS = "model.safetensors"

# A check a family adds: need(ok, field, value, rule) records "model.{field}={value!r} ({rule})".
Need = Callable[[bool, str, Any, str], None]


def _half_order(head_dim: int) -> torch.Tensor:
    """Channel order that turns interleaved rotary pairs into Hugging Face's halves."""
    return torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])


def to_halves(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows (a weight's, or a bias's entries) of each head in Hugging Face's rotary order."""
    order = _half_order(w.shape[0] // n_heads)
    return w.reshape(n_heads, w.shape[0] // n_heads, -1)[:, order].reshape(w.shape)


def from_halves(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of ``to_halves``."""
    inverse = torch.argsort(_half_order(w.shape[0] // n_heads))
    return w.reshape(n_heads, w.shape[0] // n_heads, -1)[:, inverse].reshape(w.shape)


def hf_aux_coef(cfg: LMConfig) -> float:
    """``router_aux_loss_coef`` with the balancing pressure of ``cfg.moe.aux_loss_weight``.

    Ours: ``aux_loss_weight`` times the sum over MoE layers of ``E * sum_i f_i P_i``, with
    ``f_i`` the share of first choices (Switch eq. 4). transformers' ``load_balancing_loss_func``
    (the same function in Mixtral and Qwen2-MoE) counts all k choices (its ``f`` sums to k) and
    pools the MoE layers (its ``f`` and ``P`` are means over every layer's tokens) before one
    product. At any routing whose second choices spread like the first, its loss is k times one
    layer's of ours, and its gradient on a layer's probabilities is 1/L of the pooled one's: the
    coefficient is ``aux_loss_weight * L / k`` for L MoE layers (exactly equal losses at uniform
    router probabilities)."""
    layers = sum(cfg.moe_layer(i) for i in range(cfg.n_layers))
    return cfg.moe.aux_loss_weight * layers / cfg.moe.experts_per_token


def aux_weight_from_hf(coef: float, n_moe_layers: int, top_k: int) -> float:
    """The inverse of ``hf_aux_coef``."""
    return coef * top_k / max(1, n_moe_layers)


def export_checkpoint(
    model: MoELM,
    out_dir: str | Path,
    family: str,
    rules: Callable[[LMConfig, Need], None],
    config: Callable[[LMConfig], dict[str, Any]],
    state: Callable[[MoELM], dict[str, torch.Tensor]],
) -> Path:
    """Check ``model`` against the shared rules and the family's ``rules`` (naming every field
    that does not map, before anything is written), then write ``config(model.cfg)`` as
    ``config.json`` and ``state(model)`` as ``model.safetensors`` in ``out_dir``."""
    if not isinstance(model, MoELM):
        raise TypeError(f"model must be a moesaic MoELM, got {type(model).__name__}")
    wrong = _incompatibilities(model, family, rules)
    if wrong:
        raise ValueError(
            f"cannot export to {family}; incompatible fields:\n  " + "\n  ".join(wrong)
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config(model.cfg), indent=2))
    tensors = {k: v.detach().cpu().contiguous() for k, v in state(model).items()}
    save_file(tensors, out / WEIGHTS, metadata={"format": "pt"})
    return out


def _incompatibilities(
    model: MoELM, family: str, rules: Callable[[LMConfig, Need], None]
) -> list[str]:
    cfg = model.cfg
    wrong: list[str] = []

    def need(ok: bool, field: str, value: Any, rule: str) -> None:
        if not ok:
            wrong.append(f"model.{field}={value!r} ({rule})")

    need(cfg.norm == "rmsnorm", "norm", cfg.norm, f"{family} uses 'rmsnorm'")
    need(cfg.activation == "swiglu", "activation", cfg.activation, f"{family} is 'swiglu'")
    need(cfg.positions == "rope", "positions", cfg.positions, f"{family} uses 'rope'")
    if cfg.moe is None:
        return [*wrong, f"model.moe=None ({family} needs an MoE model)"]
    moe = cfg.moe
    need(moe.router == "topk", "moe.router", moe.router, f"{family}'s router is 'topk'")
    extra = sorted(set(moe.router_options) - {"normalize"})
    need(not extra, "moe.router_options", extra, f"{family}'s router has no such options")
    need(moe.capacity_factor is None, "moe.capacity_factor", moe.capacity_factor, "dropless: None")
    need(not moe.expert_bias, "moe.expert_bias", moe.expert_bias, f"{family} experts have none")
    sharded = any(getattr(b.ffn, "expert_group", None) is not None for b in model.blocks)
    need(not sharded, "expert_group", "set", "gather the experts first: export from one process")
    rules(cfg, need)
    return wrong


def hf_config(cfg: LMConfig, architecture: str, model_type: str) -> dict[str, Any]:
    """The ``config.json`` fields both families share."""
    return {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_dropout": cfg.dropout,
        "tie_word_embeddings": cfg.tie_embeddings,
        "num_experts_per_tok": cfg.moe.experts_per_token,
        "router_aux_loss_coef": hf_aux_coef(cfg),
        "output_router_logits": False,
        "torch_dtype": "float32",
    }


def lm_fields(
    c: dict[str, Any], max_seq_len: int | None, norm_eps: float, wrong: list[str]
) -> dict[str, Any]:
    """The ``LMConfig`` fields of a Hugging Face config dict ``c`` that both families share;
    appends to ``wrong`` what moesaic cannot represent. ``max_seq_len`` overrides
    ``max_position_embeddings``; ``norm_eps`` is the family's default ``rms_norm_eps``."""
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    theta = rope.get("rope_theta", c.get("rope_theta", 10000.0))
    heads, hidden = c["num_attention_heads"], c["hidden_size"]
    kv_heads = c.get("num_key_value_heads") or heads
    if heads % kv_heads:
        wrong.append(f"num_key_value_heads={kv_heads} must divide num_attention_heads={heads}")
    checks = [
        ("hidden_act", c.get("hidden_act", "silu"), "silu", "SwiGLU experts"),
        ("head_dim", c.get("head_dim") or hidden // heads, hidden // heads, "hidden / heads"),
        ("rope type", rope.get("rope_type", rope.get("type", "default")), "default", "plain"),
    ]
    for field, value, want, why in checks:
        if value != want:
            wrong.append(f"{field}={value!r} must be {want!r} ({why})")
    return {
        "vocab_size": c["vocab_size"],
        "max_seq_len": max_seq_len or c.get("max_position_embeddings", 4096),
        "d_model": hidden,
        "n_layers": c["num_hidden_layers"],
        "n_heads": heads,
        "n_kv_heads": None if kv_heads == heads else kv_heads,
        "activation": "swiglu",
        "positions": "rope",
        "rope_theta": float(theta),
        "norm": "rmsnorm",
        "norm_eps": float(c.get("rms_norm_eps", norm_eps)),
        "tie_embeddings": bool(c.get("tie_word_embeddings", False)),
    }


def import_checkpoint(
    source: Any,
    family: str,
    lm_config: Callable[[Any, int | None], LMConfig],
    state: Callable[[LMConfig, dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    max_seq_len: int | None,
) -> MoELM:
    """A ``MoELM`` of ``lm_config(config)`` holding ``state(cfg, hf_state_dict)``: ``source`` is
    a directory (config.json and safetensors, one file or shards) or a transformers model."""
    if isinstance(source, (str, Path)):
        config, sd = _read_dir(Path(source), family)
    else:
        config, sd = source.config, source.state_dict()
    cfg = lm_config(config, max_seq_len)
    model = MoELM(cfg)
    model.load_state_dict(state(cfg, sd), strict=True)
    return model.eval()


def _read_dir(path: Path, family: str) -> tuple[dict, dict[str, torch.Tensor]]:
    config_path = path / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{path} is not a {family} checkpoint: {config_path} is missing")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} holds no *.safetensors weights")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd |= load_file(f)
    return json.loads(config_path.read_text()), sd


def hf_state(
    model: MoELM, ffn: Callable[[str, nn.Module], dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """``model``'s weights under Hugging Face's names: embeddings, norms and attention here,
    each layer's FFN from ``ffn(prefix, block.ffn)`` (prefix ``model.layers.{i}.``)."""
    cfg, D = model.cfg, model.cfg.d_model
    H, Hkv, D_kv = cfg.n_heads, cfg.kv_heads, cfg.kv_heads * (D // cfg.n_heads)
    sd = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.ln_f.weight}
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = model.head.weight
    for i, block in enumerate(model.blocks):
        p, qkv = f"model.layers.{i}.", block.attn.qkv
        sd |= {
            p + "input_layernorm.weight": block.ln1.weight,
            p + "post_attention_layernorm.weight": block.ln2.weight,
            p + "self_attn.o_proj.weight": block.attn.proj.weight,
        }
        for kind, tensor in (("weight", qkv.weight), ("bias", qkv.bias)):
            if tensor is None:
                continue
            q, k, v = tensor.split([D, D_kv, D_kv], dim=0)
            sd[p + f"self_attn.q_proj.{kind}"] = to_halves(q, H)
            sd[p + f"self_attn.k_proj.{kind}"] = to_halves(k, Hkv)
            sd[p + f"self_attn.v_proj.{kind}"] = v
        sd |= ffn(p, block.ffn)
    return sd


def moesaic_state(
    cfg: LMConfig,
    sd: dict[str, torch.Tensor],
    ffn: Callable[[str, str, int], dict[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """The inverse of ``hf_state``: ``ffn(hf_prefix, our_prefix, layer)`` maps each FFN."""
    H, Hkv = cfg.n_heads, cfg.kv_heads
    out = {"embed.weight": sd["model.embed_tokens.weight"], "ln_f.weight": sd["model.norm.weight"]}
    out["head.weight"] = sd["model.embed_tokens.weight" if cfg.tie_embeddings else "lm_head.weight"]
    for i in range(cfg.n_layers):
        p, b = f"model.layers.{i}.", f"blocks.{i}."
        out[b + "ln1.weight"] = sd[p + "input_layernorm.weight"]
        out[b + "ln2.weight"] = sd[p + "post_attention_layernorm.weight"]
        out[b + "attn.proj.weight"] = sd[p + "self_attn.o_proj.weight"]
        for kind in ("weight", "bias") if cfg.qkv_bias else ("weight",):
            q = from_halves(sd[p + f"self_attn.q_proj.{kind}"], H)
            k = from_halves(sd[p + f"self_attn.k_proj.{kind}"], Hkv)
            out[b + f"attn.qkv.{kind}"] = torch.cat([q, k, sd[p + f"self_attn.v_proj.{kind}"]])
        out |= ffn(p, b, i)
    return out


def split_experts(experts: nn.Module, prefix: str, names: dict[str, str]) -> dict:
    """Our stacked experts (``w1`` (E, D, F) ...) as one ``nn.Linear`` weight per expert and
    matrix, ``{prefix}{e}.{names[ours]}.weight``: ours is ``x @ w[e]``, ``nn.Linear``'s is
    ``x @ W.T``, so each is transposed."""
    return {
        f"{prefix}{e}.{theirs}.weight": getattr(experts, ours)[e].t()
        for e in range(experts.num_experts)
        for ours, theirs in names.items()
    }


def stack_experts(
    sd: dict[str, torch.Tensor], prefix: str, names: dict[str, str], num_experts: int
) -> dict[str, torch.Tensor]:
    """The inverse of ``split_experts``: ``{ours: (E, ...) stack}``."""
    return {
        ours: torch.stack([sd[f"{prefix}{e}.{theirs}.weight"].t() for e in range(num_experts)])
        for ours, theirs in names.items()
    }


def unfuse_experts(sd: dict[str, torch.Tensor], names: dict[str, str]) -> dict[str, torch.Tensor]:
    """``sd`` with transformers >= 5's fused experts (``experts.gate_up_proj`` (E, 2F, D): gate
    rows first, then up; ``experts.down_proj`` (E, D, F)) in the published per-expert layout
    ``experts.{e}.{names[w]}.weight`` (w1 gate, w3 up, w2 down); other keys as they are."""
    out = {}
    for key, value in sd.items():
        head, _, last = key.rpartition(".experts.")
        if last == "gate_up_proj":
            for e, (gate, up) in enumerate(zip(*value.chunk(2, dim=1))):
                out[f"{head}.experts.{e}.{names['w1']}.weight"] = gate
                out[f"{head}.experts.{e}.{names['w3']}.weight"] = up
        elif last == "down_proj":
            for e, down in enumerate(value):
                out[f"{head}.experts.{e}.{names['w2']}.weight"] = down
        else:
            out[key] = value
    return out
