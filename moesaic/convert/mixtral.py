"""Mixtral checkpoints <-> ``MoELM``: export to, and import from, the Hugging Face format.

The exported directory holds ``config.json`` and ``model.safetensors`` in the layout Mixtral is
published in (``model.layers.{i}.block_sparse_moe.experts.{j}.w1.weight`` ...), which
``transformers.MixtralForCausalLM.from_pretrained`` loads. Import reads that layout or the fused one
transformers >= 5 keeps in memory (``mlp.experts.gate_up_proj`` (E, 2F, D), ``down_proj``
(E, D, F)), from a directory or from a model object. Neither direction imports transformers.

The two models agree exactly where their architectures map; ``export_mixtral`` names every
``LMConfig`` field that does not (Mixtral has RMSNorm, SwiGLU experts, rotary positions, an MoE
in every layer and a top-k softmax router renormalised over the k chosen experts, without
capacity). One difference is only a relabelling: our rotary embedding turns channel pairs
(2i, 2i+1) of a head, Hugging Face's turns (i, i + hd/2); permuting the rows of the query and key
projections the same way inside each head maps one onto the other, and leaves every attention
score unchanged.

Shape legend (docs/shapes.md): D model dim, F expert hidden, E experts, V vocabulary.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from moesaic.config import MoEConfig
from moesaic.models.lm import LMConfig, MoELM

__all__ = [
    "export_mixtral",
    "import_mixtral",
    "mixtral_config",
    "lm_config_from_mixtral",
    "hf_aux_coef",
    "aux_weight_from_hf",
]

WEIGHTS = "model.safetensors"


def _half_order(head_dim: int) -> torch.Tensor:
    """Channel order that turns interleaved rotary pairs into Hugging Face's halves."""
    return torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])


def _to_halves(w_DD: torch.Tensor, n_heads: int) -> torch.Tensor:
    d_out, d_in = w_DD.shape
    return w_DD.view(n_heads, d_out // n_heads, d_in)[:, _half_order(d_out // n_heads)].reshape(
        d_out, d_in
    )


def _from_halves(w_DD: torch.Tensor, n_heads: int) -> torch.Tensor:
    d_out, d_in = w_DD.shape
    inverse = torch.argsort(_half_order(d_out // n_heads))
    return w_DD.view(n_heads, d_out // n_heads, d_in)[:, inverse].reshape(d_out, d_in)


def _incompatibilities(model: MoELM) -> list[str]:
    cfg = model.cfg
    wrong = []

    def need(ok: bool, field: str, value: Any, rule: str) -> None:
        if not ok:
            wrong.append(f"model.{field}={value!r} ({rule})")

    need(cfg.norm == "rmsnorm", "norm", cfg.norm, "Mixtral uses 'rmsnorm'")
    need(cfg.activation == "swiglu", "activation", cfg.activation, "Mixtral experts are 'swiglu'")
    need(cfg.positions == "rope", "positions", cfg.positions, "Mixtral uses 'rope'")
    if cfg.moe is None:
        return [*wrong, "model.moe=None (Mixtral needs an MoE model)"]
    moe = cfg.moe
    need(cfg.moe_every == 1, "moe_every", cfg.moe_every, "Mixtral has an MoE in every layer: 1")
    fd = cfg.first_dense_layers
    need(fd == 0, "first_dense_layers", fd, "Mixtral has an MoE in every layer: 0")
    need(cfg.expert_d_ff in (None, cfg.d_ff), "expert_d_ff", cfg.expert_d_ff, "Mixtral: None")
    need(moe.router == "topk", "moe.router", moe.router, "Mixtral's router is 'topk'")
    normalize = moe.router_options.get("normalize", True)
    need(normalize is True, "moe.router_options['normalize']", normalize, "Mixtral renormalises")
    extra = sorted(set(moe.router_options) - {"normalize"})
    need(not extra, "moe.router_options", extra, "Mixtral's router has no such options")
    need(moe.capacity_factor is None, "moe.capacity_factor", moe.capacity_factor, "Mixtral: None")
    need(moe.shared_d_ff == 0, "moe.shared_d_ff", moe.shared_d_ff, "Mixtral has no shared expert")
    need(not moe.expert_bias, "moe.expert_bias", moe.expert_bias, "Mixtral experts have none")
    sharded = any(getattr(b.ffn, "expert_group", None) is not None for b in model.blocks)
    need(not sharded, "expert_group", "set", "gather the experts first: export from one process")
    return wrong


def hf_aux_coef(cfg: LMConfig) -> float:
    """``router_aux_loss_coef`` with the balancing pressure of ``cfg.moe.aux_loss_weight``.

    Ours: ``aux_loss_weight`` times the sum over MoE layers of ``E * sum_i f_i P_i``, with
    ``f_i`` the share of first choices (Switch eq. 4). transformers' ``load_balancing_loss_func``
    counts all k choices (its ``f`` sums to k) and pools the layers (its ``f`` and ``P`` are means
    over every layer's tokens) before one product. At any routing whose second choices spread
    like the first, its loss is k times one layer's of ours, and its gradient on a layer's
    probabilities is 1/L of the pooled one's: the coefficient is ``aux_loss_weight * L / k``
    for L MoE layers (exactly equal losses at uniform router probabilities)."""
    layers = sum(cfg.moe_layer(i) for i in range(cfg.n_layers))
    return cfg.moe.aux_loss_weight * layers / cfg.moe.experts_per_token


def aux_weight_from_hf(coef: float, n_moe_layers: int, top_k: int) -> float:
    """The inverse of ``hf_aux_coef``."""
    return coef * top_k / max(1, n_moe_layers)


def mixtral_config(cfg: LMConfig) -> dict[str, Any]:
    """The ``config.json`` of ``cfg`` as a Mixtral model (checked by ``export_mixtral``)."""
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.d_model // cfg.n_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "sliding_window": None,
        "attention_dropout": cfg.dropout,
        "tie_word_embeddings": cfg.tie_embeddings,
        "num_local_experts": cfg.moe.num_experts,
        "num_experts_per_tok": cfg.moe.experts_per_token,
        "router_aux_loss_coef": hf_aux_coef(cfg),
        "router_jitter_noise": cfg.moe.jitter or 0.0,  # both: x * U(1 - eps, 1 + eps) in training
        "output_router_logits": False,
        "torch_dtype": "float32",
    }


def export_mixtral(model: MoELM, out_dir: str | Path) -> Path:
    """Write ``model`` as a Mixtral checkpoint (config.json + model.safetensors) in ``out_dir``.

    Raises ValueError naming every ``model.*`` field Mixtral cannot represent.

    Example::

        >>> export_mixtral(model, "out/mixtral")
        >>> hf = transformers.MixtralForCausalLM.from_pretrained("out/mixtral")
    """
    if not isinstance(model, MoELM):
        raise TypeError(f"model must be a moesaic MoELM, got {type(model).__name__}")
    wrong = _incompatibilities(model)
    if wrong:
        raise ValueError("cannot export to Mixtral; incompatible fields:\n  " + "\n  ".join(wrong))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(mixtral_config(model.cfg), indent=2))
    tensors = {k: v.detach().cpu().contiguous() for k, v in _hf_state(model).items()}
    save_file(tensors, out / WEIGHTS, metadata={"format": "pt"})
    return out


def _hf_state(model: MoELM) -> dict[str, torch.Tensor]:
    cfg, H, D = model.cfg, model.cfg.n_heads, model.cfg.d_model
    Hkv, D_kv = cfg.kv_heads, cfg.kv_heads * (D // H)
    sd = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.ln_f.weight}
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = model.head.weight
    for i, block in enumerate(model.blocks):
        p = f"model.layers.{i}."
        q, k, v = block.attn.qkv.weight.split([D, D_kv, D_kv], dim=0)
        sd |= {
            p + "input_layernorm.weight": block.ln1.weight,
            p + "post_attention_layernorm.weight": block.ln2.weight,
            p + "self_attn.q_proj.weight": _to_halves(q, H),
            p + "self_attn.k_proj.weight": _to_halves(k, Hkv),
            p + "self_attn.v_proj.weight": v,
            p + "self_attn.o_proj.weight": block.attn.proj.weight,
            p + "block_sparse_moe.gate.weight": block.ffn.router.gate.weight,
        }
        experts = block.ffn.experts
        for e in range(cfg.moe.num_experts):  # ours x @ w[e]; nn.Linear's x @ W.T: transpose
            q_ = p + f"block_sparse_moe.experts.{e}."
            sd[q_ + "w1.weight"] = experts.w1[e].t()
            sd[q_ + "w2.weight"] = experts.w2[e].t()
            sd[q_ + "w3.weight"] = experts.w3[e].t()
    return sd


def lm_config_from_mixtral(config: Any, max_seq_len: int | None = None) -> LMConfig:
    """The ``LMConfig`` of a Mixtral config (a dict or a transformers ``MixtralConfig``).

    ``max_seq_len`` overrides ``max_position_embeddings`` (rotary tables are precomputed for it).
    Raises ValueError naming every field moesaic cannot represent."""
    c = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    theta = rope.get("rope_theta", c.get("rope_theta", 10000.0))
    heads, hidden = c["num_attention_heads"], c["hidden_size"]
    seq = max_seq_len or c.get("max_position_embeddings", 4096)
    wrong = []
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
    window = c.get("sliding_window")
    if window is not None and window < seq:
        wrong.append(f"sliding_window={window} must be None or >= max_seq_len={seq}")
    if wrong:
        raise ValueError("cannot import this Mixtral config:\n  " + "\n  ".join(wrong))
    return LMConfig(
        vocab_size=c["vocab_size"],
        max_seq_len=seq,
        d_model=hidden,
        n_layers=c["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=None if kv_heads == heads else kv_heads,
        d_ff=c["intermediate_size"],
        activation="swiglu",
        positions="rope",
        rope_theta=float(theta),
        norm="rmsnorm",
        norm_eps=float(c.get("rms_norm_eps", 1e-5)),
        tie_embeddings=bool(c.get("tie_word_embeddings", False)),
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
    if isinstance(source, (str, Path)):
        config, sd = _read_dir(Path(source))
    else:
        config, sd = source.config, source.state_dict()
    cfg = lm_config_from_mixtral(config, max_seq_len)
    model = MoELM(cfg)
    model.load_state_dict(_moesaic_state(cfg, _unfused(sd, cfg)), strict=True)
    return model.eval()


def _read_dir(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    config_path = path / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{path} is not a Mixtral checkpoint: {config_path} is missing")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} holds no *.safetensors weights")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd |= load_file(f)
    return json.loads(config_path.read_text()), sd


def _unfused(sd: dict[str, torch.Tensor], cfg: LMConfig) -> dict[str, torch.Tensor]:
    """``sd`` in the published layout (per-expert w1/w2/w3 under ``block_sparse_moe``)."""
    out = {}
    for key, value in sd.items():
        key = key.replace(".mlp.gate.", ".block_sparse_moe.gate.")
        head, _, last = key.rpartition(".experts.")
        if last == "gate_up_proj":  # (E, 2F, D): gate (w1) rows first, then up (w3)
            for e, (w1, w3) in enumerate(zip(*value.split(cfg.d_ff, dim=1))):
                out[f"{_moe(head)}.experts.{e}.w1.weight"] = w1
                out[f"{_moe(head)}.experts.{e}.w3.weight"] = w3
        elif last == "down_proj":  # (E, D, F)
            for e, w2 in enumerate(value):
                out[f"{_moe(head)}.experts.{e}.w2.weight"] = w2
        else:
            out[key] = value
    return out


def _moe(head: str) -> str:
    return head.replace(".mlp", ".block_sparse_moe")


def _moesaic_state(cfg: LMConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    H, Hkv = cfg.n_heads, cfg.kv_heads
    out = {"embed.weight": sd["model.embed_tokens.weight"], "ln_f.weight": sd["model.norm.weight"]}
    out["head.weight"] = sd["model.embed_tokens.weight" if cfg.tie_embeddings else "lm_head.weight"]
    for i in range(cfg.n_layers):
        p, b = f"model.layers.{i}.", f"blocks.{i}."
        out[b + "ln1.weight"] = sd[p + "input_layernorm.weight"]
        out[b + "ln2.weight"] = sd[p + "post_attention_layernorm.weight"]
        q = _from_halves(sd[p + "self_attn.q_proj.weight"], H)
        k = _from_halves(sd[p + "self_attn.k_proj.weight"], Hkv)
        out[b + "attn.qkv.weight"] = torch.cat([q, k, sd[p + "self_attn.v_proj.weight"]])
        out[b + "attn.proj.weight"] = sd[p + "self_attn.o_proj.weight"]
        out[b + "ffn.router.gate.weight"] = sd[p + "block_sparse_moe.gate.weight"]
        for name in ("w1", "w2", "w3"):
            per_expert = [
                sd[p + f"block_sparse_moe.experts.{e}.{name}.weight"].t()
                for e in range(cfg.moe.num_experts)
            ]
            out[b + f"ffn.experts.{name}"] = torch.stack(per_expert)
    return out
