"""Vision Transformer (Dosovitskiy et al. 2021) and V-MoE (Riquelme et al. 2021): a ViT whose MLP
is an ``ms.MoE`` in some blocks.

V-MoE (§2 and §3 of the paper) replaces the MLP of every other block ("Every-2":
``moe_every=2``) or of the last n of those ("Last-n": ``moe_last=n``) with E experts of the same
width, routed by the ``vmoe`` router (noisy softmax then top-k, importance and load losses) with
a capacity ratio; ``drop_policy="priority"`` is Batch Prioritized Routing (§4), which lets one
trained model skip its least confident patches at inference (``moesaic vision capacity-curve``).
With ``moe=None`` the same class is the dense ViT; ``dense_equivalent()`` gives it the MoE
model's activated FLOPs per patch (MLP width ``top_k * d_ff`` where the MoE model has experts).

Routing and capacity groups are a forward's whole batch (vmoe groups 8 images; the capacity
``ceil(C * k * T / E)`` is then per batch of T patch tokens).

Shape legend (docs/shapes.md): B batch, C image channels, H, W image size, P patches, D width.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.nn import functional as F

from moesaic._validate import check_choice, check_dropout, check_positive_int
from moesaic.config import MoEConfig, check_model_moe
from moesaic.experts import ACTIVATIONS
from moesaic.layer import MoE
from moesaic.models.lm import DenseFFN
from moesaic.models.vision_parts import PatchEmbed, check_image_fields, moe_sites

__all__ = ["ViTConfig", "VisionTransformer", "POOLS"]

POOLS = ("gap", "token")  # mean over patches, or a learned class token (ViT's default)


@dataclasses.dataclass(kw_only=True)
class ViTConfig:
    """Architecture of ``VisionTransformer``; every field is checked in ``__post_init__``.

    ``moe`` holds the MoE layers' options (``ms.MoEConfig``; None: the dense ViT); its
    ``d_model``, ``d_ff`` and ``activation`` are this config's (leave them None there).
    ``image_size``, ``channels`` and ``num_classes`` describe the data (a training run sets them
    from its dataset).
    """

    image_size: int = 28
    channels: int = 1
    patch_size: int = 4
    num_classes: int = 10
    d_model: int = 64
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 256  # MLP hidden width (and each expert's)
    activation: str = "gelu"
    dropout: float = 0.0
    pool: str = "gap"
    moe: MoEConfig | None = None
    moe_every: int = 2  # block i holds an MoE when (i + 1) % moe_every == 0 ...
    moe_last: int = 0  # ... and is among the last moe_last such blocks (0: all of them)
    matched_d_ff: int | None = None  # dense models: MLP width where the MoE model has experts

    def __post_init__(self) -> None:
        check_image_fields("", self)
        for name in ("d_model", "n_heads", "d_ff"):
            check_positive_int(name, getattr(self, name))
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        check_choice("activation", self.activation, ACTIVATIONS)
        check_choice("pool", self.pool, POOLS)
        check_dropout("dropout", self.dropout)
        if self.matched_d_ff is not None:
            check_positive_int("matched_d_ff", self.matched_d_ff)
            if self.moe is not None:
                raise ValueError(f"matched_d_ff={self.matched_d_ff} is for dense models (moe=None)")
        if self.moe is not None:
            check_model_moe("moe", self.moe)
            if not any(self.sites()):
                raise ValueError(
                    f"moe_every={self.moe_every} places no MoE block in n_layers={self.n_layers}"
                )
            self.moe_config()

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def is_moe(self) -> bool:
        return self.moe is not None

    def sites(self) -> list[bool]:
        """Per block, whether the MoE model has its experts there."""
        return moe_sites(self.n_layers, self.moe_every, self.moe_last)

    def moe_config(self) -> MoEConfig:
        """``moe`` with ``d_model``, ``d_ff`` and ``activation`` filled in from this config."""
        if self.moe is None:
            raise ValueError("moe is None: a dense ViT has no MoE layers")
        return self.moe.inherit(
            "", d_model=self.d_model, d_ff=self.d_ff, activation=self.activation
        )

    def mlp_width(self, index: int) -> int:
        """Hidden width of block ``index``'s dense MLP (``matched_d_ff`` at the MoE sites)."""
        if self.sites()[index] and self.matched_d_ff is not None:
            return self.matched_d_ff
        return self.d_ff

    def dense_equivalent(self) -> ViTConfig:
        """The dense ViT with this model's activated MLP FLOPs per patch: width
        ``top_k * d_ff + shared_d_ff`` where this model has experts."""
        if self.moe is None:
            return self
        width = self.moe.experts_per_token * self.d_ff + self.moe.shared_d_ff
        return dataclasses.replace(self, moe=None, matched_d_ff=width)


class Attention(nn.Module):
    """Bidirectional multi-head self-attention over the patches."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x_BPD: torch.Tensor) -> torch.Tensor:
        B, P, D = x_BPD.shape
        q, k, v = self.qkv(x_BPD).view(B, P, 3, self.n_heads, D // self.n_heads).unbind(2)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.out(y.transpose(1, 2).reshape(B, P, D))


class Block(nn.Module):
    """Pre-norm ViT encoder block; the MLP is an ``ms.MoE`` at the config's MoE sites."""

    def __init__(self, cfg: ViTConfig, index: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg.d_model, cfg.n_heads)
        if cfg.is_moe and cfg.sites()[index]:
            self.mlp: nn.Module = MoE(cfg.moe_config())
        else:
            self.mlp = DenseFFN(cfg.d_model, cfg.mlp_width(index), cfg.activation)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x_BPD: torch.Tensor) -> torch.Tensor:
        x_BPD = x_BPD + self.drop(self.attn(self.ln1(x_BPD)))
        return x_BPD + self.drop(self.mlp(self.ln2(x_BPD)))


class VisionTransformer(nn.Module):
    """ViT / V-MoE classifier: ``forward(images_BCHW) -> logits (B, num_classes)``.

    ``embed(images)`` is the pooled, normalised representation (B, D) before the linear
    ``head`` (contrastive pre-training and linear probes read it).
    """

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patches = PatchEmbed(cfg.channels, cfg.patch_size, cfg.d_model)
        extra = 1 if cfg.pool == "token" else 0
        self.cls = nn.Parameter(torch.zeros(1, 1, cfg.d_model)) if extra else None
        self.pos = nn.Parameter(torch.randn(1, cfg.num_patches + extra, cfg.d_model) * 0.02)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.num_classes)
        nn.init.zeros_(self.head.weight)  # ViT: a zero-initialised head
        nn.init.zeros_(self.head.bias)

    def moe_layers(self) -> list[MoE]:
        """The model's MoE layers, first block first."""
        return [m for m in self.modules() if isinstance(m, MoE)]

    def embed(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, D)."""
        x = self.patches(images_BCHW)
        if self.cls is not None:
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.drop(x + self.pos)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return x[:, 0] if self.cls is not None else x.mean(dim=1)

    def forward(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(images_BCHW))
