"""Decoder-only Transformer language model whose FFN is an ``ms.MoE`` every ``moe_every`` layers.

Pre-norm blocks, causal ``scaled_dot_product_attention``, rotary or learned positions, optionally
tied embeddings. With ``moe=None`` the same class builds the dense baseline; with
``LMConfig.dense_equivalent()`` that baseline has the MoE model's activated FLOPs per token (its
FFN is ``top_k * expert width + shared_d_ff`` wide). GLaM and Switch put an MoE in every other
layer (``moe_every=2``: layers 1, 3, 5, ...); DeepSeekMoE (Dai et al. 2024) has fine-grained
experts narrower than the dense FFN (``expert_d_ff``), always-on shared experts
(``moe.shared_d_ff``) and a dense first layer (``first_dense_layers=1``).

Shape legend (docs/shapes.md): B batch, S sequence, D model dim, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from moesaic._validate import (
    check_choice,
    check_dropout,
    check_positive_float,
    check_positive_int,
    prefixed_errors,
)
from moesaic.config import MoEConfig, check_model_moe
from moesaic.context import routing_context
from moesaic.experts import ACTIVATIONS
from moesaic.layer import MoE
from moesaic.models.checkpointing import checkpointed

__all__ = ["LMConfig", "MoELM", "KVCache", "migrate_lm_dict"]


@dataclasses.dataclass(kw_only=True)
class LMConfig:
    """Architecture of ``MoELM``. Every field is checked in ``__post_init__``.

    ``moe`` holds the options of the MoE layers (``ms.MoEConfig``; None: a dense model). Their
    ``d_model``, ``d_ff`` and ``activation`` are this config's (``d_ff`` is ``expert_width``:
    ``expert_d_ff``, or ``d_ff`` when that is None): leave them None in ``moe``
    (``moe_config()`` fills them in); a different value there is an error naming both.

    Fine-grained experts with shared experts (DeepSeekMoE, Dai et al. 2024, sections 3.1-3.2):
    ``expert_d_ff`` makes each routed expert a fraction of the dense FFN's width ``d_ff`` (m times
    more experts of width ``d_ff / m``, m times larger ``top_k``, the same activated FLOPs);
    ``moe.shared_d_ff`` adds the always-on shared experts, n shared experts of width F being one
    shared FFN of width ``n * F`` (the same function: the shared experts' outputs are summed with
    weight 1, so their hidden units simply stack). ``first_dense_layers`` keeps the first layers
    dense (DeepSeekMoE's first layer, DeepSeek-V3's first three).
    """

    vocab_size: int = 256
    max_seq_len: int = 256
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # grouped-query attention (Mistral, Mixtral); None: n_heads
    qkv_bias: bool = False  # biases on the query, key and value projections (Qwen2)
    d_ff: int = 1024  # hidden width of the dense FFN (and of each expert, unless expert_d_ff)
    expert_d_ff: int | None = None  # hidden width of each routed expert; None means d_ff
    activation: str = "gelu"
    positions: str = "rope"  # "rope" | "learned"
    rope_theta: float = 10000.0  # rotary base: channel pair i turns by position * theta^(-2i/hd)
    norm: str = "layernorm"  # "layernorm" | "rmsnorm" (LLaMA / Mixtral)
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    dropout: float = 0.0
    moe: MoEConfig | None = None  # None: dense model
    moe_every: int = 2  # layer i is MoE when (i + 1) % moe_every == 0 ...
    first_dense_layers: int = 0  # ... and i >= first_dense_layers
    # Pyramid MoE (DeepSpeed-MoE): experts per layer, 0 for a dense layer, e.g. [0, 8, 0, 16];
    # when set it places the MoE layers instead of moe_every / first_dense_layers, and each
    # count replaces moe.num_experts at its layer. Its JSON text ("[0, 8, 0, 16]", as
    # --set model.moe_experts=... gives it) is read as the list.
    moe_experts: list[int] | str | None = None
    # Dense models only: FFN width at the layers where the MoE model has its experts
    # (dense_equivalent() sets it to top_k * d_ff + moe.shared_d_ff); None means d_ff.
    matched_d_ff: int | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "max_seq_len", "d_model", "n_layers", "n_heads", "d_ff"):
            check_positive_int(f"model.{name}", getattr(self, name))
        check_positive_int("model.moe_every", self.moe_every)
        if not isinstance(self.qkv_bias, bool):
            raise TypeError(f"model.qkv_bias={self.qkv_bias!r} must be a bool")
        check_choice("model.activation", self.activation, ACTIVATIONS)
        check_choice("model.positions", self.positions, ("rope", "learned"))
        check_choice("model.norm", self.norm, NORMS)
        for name in ("rope_theta", "norm_eps"):
            check_positive_float(f"model.{name}", getattr(self, name))
        check_dropout("model.dropout", self.dropout)
        if self.n_kv_heads is not None:
            check_positive_int("model.n_kv_heads", self.n_kv_heads)
            if self.n_heads % self.n_kv_heads:
                raise ValueError(
                    f"model.n_kv_heads={self.n_kv_heads} must divide model.n_heads={self.n_heads} "
                    f"(each key/value head serves a group of query heads)"
                )
        if self.d_model % self.n_heads:
            raise ValueError(
                f"model.d_model={self.d_model} must be divisible by model.n_heads={self.n_heads}"
            )
        if self.positions == "rope" and (self.d_model // self.n_heads) % 2:
            raise ValueError(
                f"model.positions='rope' needs an even head dim, got "
                f"d_model / n_heads = {self.d_model // self.n_heads}"
            )
        if self.matched_d_ff is not None:
            check_positive_int("model.matched_d_ff", self.matched_d_ff)
            if self.is_moe:
                raise ValueError("model.matched_d_ff is for dense models (model.moe=None)")
        if self.expert_d_ff is not None:
            check_positive_int("model.expert_d_ff", self.expert_d_ff)
            if not self.is_moe:
                raise ValueError(
                    "model.expert_d_ff is for MoE models (a dense model has no experts: "
                    "model.expert_d_ff=none)"
                )
        fd = self.first_dense_layers
        if isinstance(fd, bool) or not isinstance(fd, int) or fd < 0:
            raise ValueError(f"model.first_dense_layers={fd!r} must be an int >= 0")
        if self.is_moe and fd >= self.n_layers:
            raise ValueError(
                f"model.first_dense_layers={fd} must be < model.n_layers={self.n_layers} "
                f"(an MoE model needs a layer after the dense ones)"
            )
        if self.moe is not None:
            self._check_moe()
        if self.moe_experts is not None:
            self._check_pyramid()

    def _check_pyramid(self) -> None:
        if isinstance(self.moe_experts, str):
            try:
                self.moe_experts = json.loads(self.moe_experts)
            except ValueError:
                raise ValueError(
                    f"model.moe_experts={self.moe_experts!r} must be a list of expert counts, "
                    "e.g. [0, 8, 0, 16]"
                ) from None
        counts = self.moe_experts
        if isinstance(counts, tuple):
            counts = self.moe_experts = list(counts)
        if not isinstance(counts, list) or len(counts) != self.n_layers:
            raise ValueError(
                f"model.moe_experts={counts!r} must be a list of model.n_layers={self.n_layers} "
                "expert counts (0 for a dense layer)"
            )
        for i, n in enumerate(counts):
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ValueError(f"model.moe_experts[{i}]={n!r} must be an int >= 0")
        if self.moe is None:
            return  # a dense model uses it only to place matched_d_ff (dense_equivalent)
        if not any(counts):
            raise ValueError(f"model.moe_experts={list(counts)} needs at least one count > 0")
        k = self.moe.experts_per_token
        for i, n in enumerate(counts):
            if 0 < n < k:
                raise ValueError(
                    f"model.moe_experts[{i}]={n} must be >= model.moe.top_k={k} "
                    "(or 0 for a dense layer)"
                )

    def _check_moe(self) -> None:
        check_model_moe("model.moe", self.moe)
        self.moe_config()  # d_model, d_ff, activation agree, and the router takes d_model

    @property
    def kv_heads(self) -> int:
        """Key/value heads: ``n_kv_heads``, or ``n_heads`` (plain multi-head attention)."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def is_moe(self) -> bool:
        return self.moe is not None

    @property
    def expert_width(self) -> int:
        """Hidden width of each routed expert: ``expert_d_ff``, or ``d_ff`` when it is None."""
        return self.d_ff if self.expert_d_ff is None else self.expert_d_ff

    def moe_config(self) -> MoEConfig:
        """The config of this model's MoE layers: ``moe`` with ``d_model``, ``d_ff`` (the
        ``expert_width``) and ``activation`` filled in from the model."""
        if self.moe is None:
            raise ValueError("model.moe is None: a dense model has no MoE layers")
        with prefixed_errors("model.moe", MoEConfig):
            if self.expert_d_ff is None:
                return self.moe.inherit(
                    "model.", d_model=self.d_model, d_ff=self.d_ff, activation=self.activation
                )
            # named as the model's field: "d_ff=128 conflicts with model.expert_d_ff=64"
            moe = self.moe.inherit("model.expert_", d_ff=self.expert_d_ff)
            return moe.inherit("model.", d_model=self.d_model, activation=self.activation)

    def expert_site(self, index: int) -> bool:
        """Whether layer ``index`` is where an MoE model has its MoE layer (``moe_experts``, or
        ``moe_every`` and ``first_dense_layers``; a dense model's ``matched_d_ff`` applies
        there)."""
        if self.moe_experts is not None:
            return self.moe_experts[index] > 0
        return index >= self.first_dense_layers and (index + 1) % self.moe_every == 0

    def layer_experts(self, index: int) -> int:
        """Experts of layer ``index`` (0 for a dense layer)."""
        if not self.moe_layer(index):
            return 0
        return self.moe.num_experts if self.moe_experts is None else self.moe_experts[index]

    def layer_moe_config(self, index: int) -> MoEConfig:
        """``moe_config()`` with layer ``index``'s expert count (pyramid MoE)."""
        cfg = self.moe_config()
        n = self.layer_experts(index)
        return cfg if n == cfg.num_experts else dataclasses.replace(cfg, num_experts=n)

    def moe_layer(self, index: int) -> bool:
        return self.is_moe and self.expert_site(index)

    def ffn_width(self, index: int) -> int:
        """Hidden width of layer ``index``'s dense FFN (of each routed expert, for an MoE
        layer)."""
        if self.moe_layer(index):
            return self.expert_width
        matched = self.expert_site(index) and self.matched_d_ff is not None
        return self.matched_d_ff if matched else self.d_ff

    def dense_equivalent(self) -> LMConfig:
        """The dense model with this model's activated FFN FLOPs per token: where this model has
        an MoE layer of k experts of width F and a shared expert of width S, the dense model has
        one FFN of width k*F + S."""
        if not self.is_moe:
            return self
        width = self.moe.experts_per_token * self.expert_width + self.moe.shared_d_ff
        return dataclasses.replace(self, moe=None, expert_d_ff=None, matched_d_ff=width)


# The MoE options LMConfig held at the model level before they moved into ``LMConfig.moe``
# (run directories and checkpoints written before then store them so); LMConfig's old defaults.
FLAT_MOE_FIELDS = {
    "num_experts": 0,
    "top_k": 1,
    "router": "switch",
    "capacity_factor": None,
    "drop_policy": "position",
    "aux_loss_weight": 0.01,
    "z_loss_weight": 0.0,
    "router_options": {},
}


def migrate_lm_dict(data: dict[str, Any]) -> dict[str, Any]:
    """A model config dict (``config_to_dict``) written with the MoE options at the model level
    (``model.num_experts``, ``model.top_k``, ...) in today's layout: those keys under
    ``model.moe``, with ``num_experts=0`` (a dense model) as ``moe=None``. A dict already in
    today's layout comes back unchanged."""
    if "moe" in data or not FLAT_MOE_FIELDS.keys() & data.keys():
        return data
    data = dict(data)
    moe = {name: data.pop(name, default) for name, default in FLAT_MOE_FIELDS.items()}
    data["moe"] = moe if moe["num_experts"] else None
    return data


class KVCache:
    """Keys and values of the tokens seen so far, per layer, for incremental decoding."""

    def __init__(self, n_layers: int) -> None:
        self.k: list[torch.Tensor | None] = [None] * n_layers
        self.v: list[torch.Tensor | None] = [None] * n_layers

    @property
    def length(self) -> int:
        return 0 if self.k[0] is None else self.k[0].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if self.k[layer] is not None:
            k = torch.cat([self.k[layer], k], dim=2)
            v = torch.cat([self.v[layer], v], dim=2)
        self.k[layer], self.v[layer] = k, v
        return k, v


def _rope_tables(
    max_len: int, head_dim: int, theta: float = 10000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    # RoFormer (Su et al. 2021): rotate pairs of channels by position * theta^(-2i/d).
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = torch.outer(torch.arange(max_len).float(), inv_freq)  # (S, head_dim / 2)
    return angles.cos(), angles.sin()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


class Attention(nn.Module):
    """Causal self-attention; with ``n_kv_heads`` < ``n_heads``, grouped-query attention
    (Ainslie et al. 2023): each key/value head serves ``n_heads / n_kv_heads`` query heads, and
    the KV cache holds only the key/value heads. ``qkv`` stacks the query rows (H * hd), then the
    key rows and the value rows (Hkv * hd each), and has a bias with ``qkv_bias``."""

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.d_model // cfg.n_heads
        self.n_kv_heads = cfg.kv_heads
        kv = self.n_kv_heads * self.head_dim
        self.qkv = nn.Linear(cfg.d_model, cfg.d_model + 2 * kv, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.dropout = cfg.dropout

    def forward(
        self, x_BSD, rope, cache: KVCache | None, layer: int, start: int, pad_B=None
    ) -> torch.Tensor:
        """``start``: how many tokens the cache held before this forward. ``pad_B``: each
        row's count of left-padding tokens (None: none), which no query attends to and which
        shift the row's rotary positions so its first real token is at position 0."""
        B, S, D = x_BSD.shape
        H, Hkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.qkv(x_BSD).split([H * hd, Hkv * hd, Hkv * hd], dim=-1)
        q = q.view(B, S, H, hd).transpose(1, 2)  # (B, H, S, hd)
        k = k.view(B, S, Hkv, hd).transpose(1, 2)  # (B, Hkv, S, hd)
        v = v.view(B, S, Hkv, hd).transpose(1, 2)
        if rope is not None:
            if pad_B is None:
                cos, sin = rope[0][start : start + S], rope[1][start : start + S]
            else:  # per-row positions: (B, 1, S, hd / 2) tables
                pos_BS = _positions(pad_B, start, S)
                cos, sin = rope[0][pos_BS].unsqueeze(1), rope[1][pos_BS].unsqueeze(1)
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        # Causal over the whole context: a query at position start+i sees keys 0..start+i.
        if pad_B is not None:
            mask = _padding_mask(pad_B, S, start + S)
        else:
            mask = None if start == 0 else _causal_mask(S, start + S, x_BSD.device)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=Hkv != H,
        )
        return self.proj(y.transpose(1, 2).reshape(B, S, D))


def _positions(pad_B: torch.Tensor, start: int, length: int) -> torch.Tensor:
    """(B, S) position of each token counted from its row's first real token (pads: 0)."""
    pos = torch.arange(start, start + length, device=pad_B.device)
    return (pos[None, :] - pad_B[:, None]).clamp(min=0)


def _padding_mask(pad_B: torch.Tensor, q_len: int, k_len: int) -> torch.Tensor:
    """(B, 1, q_len, k_len) causal mask that also hides each row's left padding; a padding
    query sees itself, so no row of the softmax is empty."""
    causal = _causal_mask(q_len, k_len, pad_B.device)
    k_pos = torch.arange(k_len, device=pad_B.device)
    q_pos = k_pos[k_len - q_len :]
    real_BK = k_pos[None, :] >= pad_B[:, None]
    self_QK = q_pos[:, None] == k_pos[None, :]
    return (causal & (real_BK[:, None, :] | self_QK))[:, None]


def _causal_mask(q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    offset = k_len - q_len
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(diagonal=offset)


class DenseFFN(nn.Module):
    """``w2(act(w1 x))``, or ``w2(silu(w1 x) * w3 x)`` for swiglu; no biases, like the experts."""

    def __init__(self, d_model: int, d_ff: int, activation: str) -> None:
        super().__init__()
        self.w1 = nn.Linear(d_model, d_ff, bias=False)
        self.w2 = nn.Linear(d_ff, d_model, bias=False)
        self.w3 = nn.Linear(d_model, d_ff, bias=False) if activation == "swiglu" else None
        self.act = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.w1(x))
        return self.w2(h * self.w3(x) if self.w3 is not None else h)


NORMS = ("layernorm", "rmsnorm")


def make_norm(cfg: LMConfig) -> nn.Module:
    """The model's normalisation layer: LayerNorm (with bias) or RMSNorm (weight only)."""
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)


class Block(nn.Module):
    def __init__(self, cfg: LMConfig, index: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = make_norm(cfg), make_norm(cfg)
        self.attn = Attention(cfg)
        if cfg.moe_layer(index):
            self.ffn: nn.Module = MoE(cfg.layer_moe_config(index))
        else:
            self.ffn = DenseFFN(cfg.d_model, cfg.ffn_width(index), cfg.activation)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, rope, cache, layer, start, pad_B=None):
        x = x + self.drop(self.attn(self.ln1(x), rope, cache, layer, start, pad_B))
        return x + self.drop(self.ffn(self.ln2(x)))


class MoELM(nn.Module):
    """The language model. ``forward(idx_BS) -> logits_BSV``; see ``loss`` for training.

    ``expert_group`` (a torch.distributed process group) shards every MoE layer's experts over
    its ranks (``ms.MoE(expert_group=...)``); every forward is then collective.

    Example::

        >>> model = MoELM(LMConfig(moe=ms.MoEConfig(num_experts=8)))
        >>> logits = model(torch.randint(0, 256, (2, 64)))
    """

    def __init__(self, cfg: LMConfig, expert_group: object | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = (
            nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.positions == "learned" else None
        )
        if cfg.positions == "rope":
            cos, sin = _rope_tables(cfg.max_seq_len, cfg.d_model // cfg.n_heads, cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        # per-block activation checkpointing in training (``train.checkpoint_activations``):
        # each block keeps its input and recomputes the rest in backward
        self.checkpoint_activations = False
        self.ln_f = make_norm(cfg)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.reset_parameters()
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        # Hash routing (Roller et al. 2021) hashes the current token's id; the model knows them.
        self._token_ids = any(
            isinstance(b.ffn, MoE) and b.ffn.router.reads_token_ids for b in self.blocks
        )
        if expert_group is not None:  # initialise whole, then shard: ranks match one process
            self.shard_experts(expert_group)

    def shard_experts(self, expert_group: object) -> None:
        """Keep only this rank's experts of every MoE layer (``MoE.shard_experts``): a model
        built or loaded whole and then sharded gives every rank the single-process experts."""
        for block in self.blocks:
            if isinstance(block.ffn, MoE):
                block.ffn.shard_experts(expert_group)

    def reset_parameters(self) -> None:
        # GPT-2: N(0, 0.02) everywhere, residual output projections scaled by 1/sqrt(2 * layers);
        # experts get the same law as the dense FFN so MoE and dense start alike.
        std, resid = 0.02, 0.02 / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("qkv.bias"):
                nn.init.zeros_(p)  # as Qwen2 starts them
            if p.dim() < 2 or "router" in name:
                continue  # norms keep (1, 0); routers keep their paper's init
            last = name.rsplit(".", 1)[-1]
            is_output = name.endswith("proj.weight") or last == "w2" or name.endswith("w2.weight")
            nn.init.normal_(p, 0.0, resid if is_output else std)

    def forward(
        self,
        idx_BS: torch.Tensor,
        cache: KVCache | None = None,
        pad_B: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, S, V). ``pad_B`` (LongTensor (B,), for batched generation): row b's
        first ``pad_B[b]`` tokens are left padding, hidden from attention, and its positions
        start at its first real token, so each row computes as it would alone."""
        return self.head(self.features(idx_BS, cache, pad_B=pad_B))

    def features(
        self,
        idx_BS: torch.Tensor,
        cache: KVCache | None = None,
        prefix_BPD: torch.Tensor | None = None,
        pad_B: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The final normed hidden states (B, S, D) that the output head reads; with
        ``prefix_BPD`` (soft-prompt vectors, prompt tuning) those P positions come first and the
        output is (B, P + S, D). ``pad_B`` as in ``forward``."""
        if prefix_BPD is not None and (cache is not None or pad_B is not None):
            raise ValueError("a soft-prompt prefix cannot be combined with a KV cache or padding")
        P = 0 if prefix_BPD is None else prefix_BPD.shape[1]
        self._check(idx_BS, cache, extra=P)
        start = cache.length if cache is not None else 0
        x = self.embed(idx_BS)
        if prefix_BPD is not None:
            x = torch.cat([prefix_BPD.to(x.dtype), x], dim=1)
        if self.pos is not None:
            S = x.shape[1]
            if pad_B is None:
                x = x + self.pos(torch.arange(start, start + S, device=idx_BS.device))
            else:
                x = x + self.pos(_positions(pad_B, start, S))
        x = self.drop(x)
        rope = (self.rope_cos, self.rope_sin) if self.pos is None else None
        if self._token_ids:
            # prompt positions carry no token: id 0 stands in for the routers that hash ids
            ids = F.pad(idx_BS, (P, 0)) if P else idx_BS
            with routing_context(token_ids=ids):
                x = self._blocks(x, rope, cache, start, pad_B)
        else:
            x = self._blocks(x, rope, cache, start, pad_B)
        return self.ln_f(x)

    def _blocks(self, x, rope, cache: KVCache | None, start: int, pad_B=None) -> torch.Tensor:
        recompute = (
            self.checkpoint_activations
            and self.training
            and torch.is_grad_enabled()
            and cache is None
        )
        for i, block in enumerate(self.blocks):
            if recompute:
                x = checkpointed(block, x, rope, None, i, start, pad_B)
            else:
                x = block(x, rope, cache, i, start, pad_B)
        return x

    def loss(self, idx_BS: torch.Tensor, targets_BS: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy (the aux losses are read with ``ms.aux_loss(model)``)."""
        logits = self(idx_BS)
        if not isinstance(targets_BS, torch.Tensor) or targets_BS.shape != idx_BS.shape:
            got = tuple(targets_BS.shape) if isinstance(targets_BS, torch.Tensor) else targets_BS
            raise ValueError(f"targets.shape={got} must equal idx.shape={tuple(idx_BS.shape)}")
        if targets_BS.dtype != torch.int64:
            raise TypeError(f"targets.dtype={targets_BS.dtype} must be torch.int64 (token ids)")
        return F.cross_entropy(logits.flatten(0, 1).float(), targets_BS.flatten())

    def _check(self, idx_BS: torch.Tensor, cache: KVCache | None, extra: int = 0) -> None:
        if not isinstance(idx_BS, torch.Tensor) or idx_BS.dtype not in (torch.int64, torch.int32):
            raise TypeError("idx must be a LongTensor of token ids with shape (batch, seq)")
        if idx_BS.dim() != 2:
            raise ValueError(f"idx.shape={tuple(idx_BS.shape)} must be (batch, seq)")
        end = idx_BS.shape[1] + extra + (cache.length if cache is not None else 0)
        if end > self.cfg.max_seq_len:
            raise ValueError(
                f"sequence length {end} exceeds model.max_seq_len={self.cfg.max_seq_len}"
            )
        if idx_BS.device != self.embed.weight.device:
            raise ValueError(
                f"idx.device={idx_BS.device} must match the model's device "
                f"{self.embed.weight.device}"
            )
        if idx_BS.numel() and (int(idx_BS.min()) < 0 or int(idx_BS.max()) >= self.cfg.vocab_size):
            raise ValueError(f"token ids must be in [0, vocab_size={self.cfg.vocab_size})")
