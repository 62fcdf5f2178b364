"""MLP-Mixer (Tolstikhin et al. 2021) and Sparse-MLP (Lou et al. 2021, §3): all-MLP image
classifiers, with MoE layers in the sparse blocks of the latter.

A Mixer block alternates two MLPs over the (patches x channels) table of an image: token mixing
mixes along the patches within each channel, channel mixing along the channels within each
patch (Tolstikhin et al. 2021, §2, pre-norm, residual). Sparse-MLP ("Cross-token Modeling with
Conditional Computation", Lou et al. 2021, §3) turns some blocks into sparse blocks with two
kinds of MoE: MoE_s (``token_moe``) replaces the token-mixing MLP and routes each channel-row
of the table (a vector of length S, the patch count) as one token; MoE_c (``moe``) replaces the
channel-mixing MLP and routes each patch (length C) as usual. A pair of re-represent layers
(``rerep_patches`` S', ``rerep_channels`` C') can reshape MoE_s's input from S x C to S' x C'
(fewer, longer channel-rows) and back. With ``moe`` and ``token_moe`` None the same class is
the dense MLP-Mixer; ``MixerConfig.dense_equivalent()`` gives it the sparse model's activated
expert-MLP FLOPs.

Shape legend (docs/shapes.md): B batch, C image channels, H, W image size, P patches (the
paper's S), D channels per patch (the paper's C), R and Q the channel-rows and patches the
token-mixing MLP sees (D and P, or the re-represented C' and S'), F hidden width.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from moesaic._validate import (
    check_choice,
    check_dropout,
    check_positive_int,
    prefixed_errors,
)
from moesaic.config import MoEConfig, check_model_moe
from moesaic.experts import ACTIVATIONS
from moesaic.layer import MoE
from moesaic.models.lm import DenseFFN
from moesaic.models.vision_parts import PatchEmbed, check_image_fields, moe_sites

__all__ = ["MixerConfig", "MixerModel", "MixerBlock", "TokenMixing", "STAGES"]

# The keys of ``MixerConfig.stage_flops()``.
STAGES = (
    "patch_embed",
    "token_mlp",
    "token_moe",
    "rerep",
    "channel_mlp",
    "channel_moe",
    "head",
)


@dataclasses.dataclass(kw_only=True)
class MixerConfig:
    """Architecture of ``MixerModel``; every field is checked in ``__post_init__``.

    ``moe`` (MoE_c, channel mixing) and ``token_moe`` (MoE_s, token mixing) hold the options of
    the sparse blocks' MoE layers (``ms.MoEConfig``; None: a dense MLP there). The model fills
    in their ``d_model``, ``d_ff`` and ``activation`` (leave them None; a different value is an
    error naming both): MoE_c takes ``d_model`` and ``d_ff``, MoE_s takes the patch count S (or
    ``rerep_patches``) and ``token_d_ff``. ``moe_every`` / ``moe_last`` place the sparse blocks
    (``vision_parts.moe_sites``; Sparse-MLP puts them at the end of the network).

    The re-represent layers (``rerep_patches`` S', ``rerep_channels`` C', both > 0 or both 0)
    wrap MoE_s and need ``token_moe``. ``matched_d_ff`` / ``matched_token_d_ff`` are for dense
    models: the channel / token MLP widths at the sparse sites (``dense_equivalent()`` sets
    them). ``image_size``, ``channels`` and ``num_classes`` describe the data.
    """

    image_size: int = 28
    channels: int = 1
    patch_size: int = 4
    num_classes: int = 10
    d_model: int = 64  # D (the paper's C): channels per patch
    n_layers: int = 4
    token_d_ff: int = 64  # hidden width of the token-mixing MLP (and of each MoE_s expert)
    d_ff: int = 256  # hidden width of the channel-mixing MLP (and of each MoE_c expert)
    activation: str = "gelu"
    dropout: float = 0.0
    moe: MoEConfig | None = None  # MoE_c: channel-mixing experts in the sparse blocks
    token_moe: MoEConfig | None = None  # MoE_s: token-mixing experts, routed channel-rows
    moe_every: int = 1  # sparse blocks: moe_sites(n_layers, moe_every, moe_last)
    moe_last: int = 0
    rerep_patches: int = 0  # S' of the re-represent layers (0 with rerep_channels=0: none)
    rerep_channels: int = 0  # C'
    matched_d_ff: int | None = None  # dense models: channel-MLP width at the sparse sites
    matched_token_d_ff: int | None = None  # dense models: token-MLP width at the sparse sites

    def __post_init__(self) -> None:
        check_image_fields("", self)
        for name in ("d_model", "token_d_ff", "d_ff"):
            check_positive_int(f"{name}", getattr(self, name))
        check_choice("activation", self.activation, ACTIVATIONS)
        check_dropout("dropout", self.dropout)
        for name in ("moe", "token_moe"):
            self._check_moe_field(name)
        self._check_rerep()
        for name in ("matched_d_ff", "matched_token_d_ff"):
            value = getattr(self, name)
            if value is not None:
                check_positive_int(f"{name}", value)
                if self.is_moe:
                    raise ValueError(
                        f"{name}={value} is for dense models (moe=None and token_moe=None)"
                    )
        if self.is_moe and not any(self.sparse_sites()):
            raise ValueError(
                f"moe_every={self.moe_every} places no sparse block in "
                f"n_layers={self.n_layers} (it must be <= n_layers)"
            )
        if self.moe is not None:
            self.moe_config()  # d_model, d_ff, activation agree; the router takes d_model
        if self.token_moe is not None:
            self.token_moe_config()

    def _check_moe_field(self, name: str) -> None:
        check_model_moe(name, getattr(self, name))

    def _check_rerep(self) -> None:
        S2, C2 = self.rerep_patches, self.rerep_channels
        for name, value in (("rerep_patches", S2), ("rerep_channels", C2)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}={value!r} must be an int >= 0 (0: none)")
        if (S2 > 0) != (C2 > 0):
            raise ValueError(
                f"rerep_patches={S2} and rerep_channels={C2} must both be > 0 "
                "(re-represent layers) or both 0 (none)"
            )
        if S2 and self.token_moe is None:
            raise ValueError(
                f"rerep_patches={S2}, rerep_channels={C2} need token_moe "
                "(the re-represent layers reshape the input of the token-mixing MoE)"
            )

    @property
    def num_patches(self) -> int:
        """S: ``(image_size / patch_size) ** 2``."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def is_moe(self) -> bool:
        return self.moe is not None or self.token_moe is not None

    @property
    def rerep(self) -> bool:
        """Whether the sparse blocks have re-represent layers around MoE_s."""
        return self.rerep_patches > 0

    @property
    def token_rows(self) -> int:
        """Channel-rows per image that MoE_s routes: C' with re-represent layers, else D."""
        return self.rerep_channels if self.rerep else self.d_model

    @property
    def token_length(self) -> int:
        """Length of each channel-row MoE_s routes (its ``d_model``): S', else S."""
        return self.rerep_patches if self.rerep else self.num_patches

    def sparse_sites(self) -> list[bool]:
        """Per block, whether it is a sparse block (holds the MoE layers of an MoE model, the
        ``matched_*`` widths of a dense one)."""
        return moe_sites(self.n_layers, self.moe_every, self.moe_last)

    def moe_config(self) -> MoEConfig:
        """MoE_c's config: ``moe`` with ``d_model``, ``d_ff`` and ``activation`` filled in."""
        if self.moe is None:
            raise ValueError("moe is None: this model has no channel-mixing MoE")
        with prefixed_errors("moe", MoEConfig):
            return self.moe.inherit(
                "", d_model=self.d_model, d_ff=self.d_ff, activation=self.activation
            )

    def token_moe_config(self) -> MoEConfig:
        """MoE_s's config: ``token_moe`` with ``d_model`` (``token_length``: S, or S' with
        re-represent layers), ``d_ff`` (``token_d_ff``) and ``activation`` filled in."""
        if self.token_moe is None:
            raise ValueError("token_moe is None: this model has no token-mixing MoE")
        width, given = self.token_length, self.token_moe.d_model
        if given is not None and given != width:
            source = (
                "rerep_patches" if self.rerep else "the patch count (image_size / patch_size)^2"
            )
            raise ValueError(
                f"token_moe.d_model={given} conflicts with {source}={width} (MoE_s routes "
                "channel-rows of that length; leave d_model None to take it)"
            )
        with prefixed_errors("token_moe", MoEConfig):
            moe = self.token_moe.inherit("token_", d_ff=self.token_d_ff)
            return moe.inherit("", d_model=width, activation=self.activation)

    def channel_mlp_width(self, index: int) -> int:
        """Hidden width of block ``index``'s dense channel MLP (``matched_d_ff`` at sparse
        sites when set)."""
        matched = self.sparse_sites()[index] and self.matched_d_ff is not None
        return self.matched_d_ff if matched else self.d_ff

    def token_mlp_width(self, index: int) -> int:
        """Hidden width of block ``index``'s dense token MLP (``matched_token_d_ff`` at sparse
        sites when set)."""
        matched = self.sparse_sites()[index] and self.matched_token_d_ff is not None
        return self.matched_token_d_ff if matched else self.token_d_ff

    def dense_equivalent(self) -> MixerConfig:
        """The dense MLP-Mixer with this model's activated expert-MLP FLOPs: where this model
        has an MoE of k experts of width F and a shared expert of width F_s, the dense model has
        one MLP of width ``k * F + F_s`` (channel and token mixing each).

        The re-represent layers are dropped: their FLOPs are extra in the sparse model, and
        MoE_s's FLOPs equal the matched token MLP's only when ``S' * C' = S * C`` (e.g.
        ``S' = 2S, C' = C/2``), since MoE_s then routes C' rows of length S'. Routers are not
        counted either."""
        if not self.is_moe:
            return self

        def width(moe: MoEConfig | None, d_ff: int) -> int | None:
            return None if moe is None else moe.experts_per_token * d_ff + moe.shared_d_ff

        return dataclasses.replace(
            self,
            moe=None,
            token_moe=None,
            rerep_patches=0,
            rerep_channels=0,
            matched_d_ff=width(self.moe, self.d_ff),
            matched_token_d_ff=width(self.token_moe, self.token_d_ff),
        )

    def stage_flops(self) -> dict[str, int]:
        """Forward FLOPs per image of each stage (keys ``STAGES``), 2 per multiply-add, on the
        activated path: each MoE counts its top-k experts (and shared expert) with no token
        dropped. Routers, LayerNorms, activations, biases, the combine and the pooling are not
        counted."""
        P, D, act = self.num_patches, self.d_model, self.activation
        flops = dict.fromkeys(STAGES, 0)
        flops["patch_embed"] = 2 * P * D * self.channels * self.patch_size**2
        flops["head"] = 2 * D * self.num_classes
        for i, site in enumerate(self.sparse_sites()):
            if site and self.token_moe is not None:
                R, Q = self.token_rows, self.token_length
                hidden = _activated_width(self.token_moe, self.token_d_ff)
                flops["token_moe"] += _mlp_flops(R, Q, hidden, act)
                if self.rerep:  # Linear(D, R) and back on P patches; Linear(P, Q) and back
                    flops["rerep"] += 2 * (2 * P * D * R) + 2 * (2 * R * P * Q)
            else:
                flops["token_mlp"] += _mlp_flops(D, P, self.token_mlp_width(i), act)
            if site and self.moe is not None:
                hidden = _activated_width(self.moe, self.d_ff)
                flops["channel_moe"] += _mlp_flops(P, D, hidden, act)
            else:
                flops["channel_mlp"] += _mlp_flops(P, D, self.channel_mlp_width(i), act)
        return flops


def _activated_width(moe: MoEConfig, d_ff: int) -> int:
    """Hidden units an MoE runs per token: k experts of width ``d_ff`` and the shared expert."""
    return moe.experts_per_token * d_ff + moe.shared_d_ff


def _mlp_flops(rows: int, width: int, hidden: int, activation: str) -> int:
    """FLOPs of ``rows`` vectors of length ``width`` through a bias-free MLP of ``hidden``
    units: two products (three for swiglu, whose gate is a third)."""
    products = 3 if activation == "swiglu" else 2
    return 2 * rows * width * hidden * products


class TokenMixing(nn.Module):
    """The token-mixing branch: ``mlp`` on the channel-rows of the (B, P, D) input, i.e. along
    the patches. For an ``ms.MoE`` (MoE_s, Lou et al. 2021, §3) each of the B * D rows of
    length P is one routed token.

    With ``rerep_patches`` S' and ``rerep_channels`` C' (both > 0), the re-represent layers
    reshape the table first: ``Linear(D, C')`` on the channels, ``Linear(P, S')`` on the
    patches, so ``mlp`` sees B * C' rows of length S'; ``Linear(S', P)`` and ``Linear(C', D)``
    map its output back to (B, P, D).
    """

    def __init__(
        self,
        mlp: nn.Module,
        patches: int,
        channels: int,
        rerep_patches: int = 0,
        rerep_channels: int = 0,
    ) -> None:
        super().__init__()
        self.mlp = mlp
        if rerep_patches:
            self.to_channels: nn.Module = nn.Linear(channels, rerep_channels)
            self.to_patches: nn.Module = nn.Linear(patches, rerep_patches)
            self.from_patches: nn.Module = nn.Linear(rerep_patches, patches)
            self.from_channels: nn.Module = nn.Linear(rerep_channels, channels)
        else:
            self.to_channels = self.to_patches = nn.Identity()
            self.from_patches = self.from_channels = nn.Identity()

    def forward(self, x_BPD: torch.Tensor) -> torch.Tensor:
        x_BRP = self.to_channels(x_BPD).transpose(1, 2)  # channel-rows along the patches
        y_BRQ = self.mlp(self.to_patches(x_BRP))  # MoE_s: each of the B * R rows is a token
        return self.from_channels(self.from_patches(y_BRQ).transpose(1, 2))  # (B, P, D)


class MixerBlock(nn.Module):
    """Pre-norm Mixer block (Tolstikhin et al. 2021, §2): ``x + T(MLP_tok(T(LN(x))))``, then
    ``x + MLP_ch(LN(x))``; at a sparse site of an MoE model MoE_s and MoE_c replace the MLPs
    they are configured for (Lou et al. 2021, §3)."""

    def __init__(self, cfg: MixerConfig, index: int) -> None:
        super().__init__()
        P, D = cfg.num_patches, cfg.d_model
        site = cfg.sparse_sites()[index]
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        if site and cfg.token_moe is not None:
            moe_s = MoE(cfg.token_moe_config())
            self.token_mix = TokenMixing(moe_s, P, D, cfg.rerep_patches, cfg.rerep_channels)
        else:
            mlp = DenseFFN(P, cfg.token_mlp_width(index), cfg.activation)
            self.token_mix = TokenMixing(mlp, P, D)
        if site and cfg.moe is not None:
            self.channel_mix: nn.Module = MoE(cfg.moe_config())
        else:
            self.channel_mix = DenseFFN(D, cfg.channel_mlp_width(index), cfg.activation)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x_BPD: torch.Tensor) -> torch.Tensor:
        x_BPD = x_BPD + self.drop(self.token_mix(self.ln1(x_BPD)))
        return x_BPD + self.drop(self.channel_mix(self.ln2(x_BPD)))


class MixerModel(nn.Module):
    """MLP-Mixer / Sparse-MLP classifier: ``forward(images_BCHW) -> logits (B, num_classes)``.

    Patch embedding, ``n_layers`` Mixer blocks, LayerNorm, the mean over patches, then the
    linear ``head``. ``embed(images)`` is everything before the head, the pooled
    representation (B, D) that contrastive pre-training and linear probes read. The dense MLPs
    have no biases, like the experts, so a dense model and its MoE counterpart differ only in
    routing. Aux losses are read with ``ms.aux_loss(model)``.

    Example::

        >>> moe = ms.MoEConfig(num_experts=4, router="topk", top_k=2)
        >>> model = MixerModel(MixerConfig(moe=moe, token_moe=moe, moe_last=2))
        >>> logits = model(torch.randn(8, 1, 28, 28))
    """

    def __init__(self, cfg: MixerConfig) -> None:
        super().__init__()
        if not isinstance(cfg, MixerConfig):
            raise TypeError(f"cfg must be a MixerConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.patches = PatchEmbed(cfg.channels, cfg.patch_size, cfg.d_model)
        self.blocks = nn.ModuleList(MixerBlock(cfg, i) for i in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.num_classes)

    def moe_layers(self) -> list[MoE]:
        """The model's MoE layers, first block first, MoE_s before MoE_c within a block."""
        return [m for m in self.modules() if isinstance(m, MoE)]

    def embed(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, D): the normed patch features averaged over the patches."""
        self._check(images_BCHW)
        x_BPD = self.patches(images_BCHW)
        for block in self.blocks:
            x_BPD = block(x_BPD)
        return self.norm(x_BPD).mean(dim=1)

    def forward(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(images_BCHW))

    def _check(self, images: torch.Tensor) -> None:
        if not isinstance(images, torch.Tensor) or not images.dtype.is_floating_point:
            raise TypeError("images must be a floating point tensor (batch, channels, H, W)")
        cfg = self.cfg
        want = (cfg.channels, cfg.image_size, cfg.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != want:
            raise ValueError(
                f"images.shape={tuple(images.shape)} must be (batch, {', '.join(map(str, want))})"
                " (channels, image_size, image_size): the token-mixing MLPs "
                "are built for that many patches"
            )
