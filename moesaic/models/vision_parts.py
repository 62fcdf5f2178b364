"""Pieces the vision models share (``vit.py``, ``mixer.py``): patch embedding, the placement of
MoE blocks, and the checks of their common config fields.

Shape legend (docs/shapes.md): B batch, C image channels, H, W image size, P patches, D width.
"""

from __future__ import annotations

import torch
from torch import nn

from moesaic._validate import check_positive_int

__all__ = ["PatchEmbed", "moe_sites", "check_image_fields"]


def check_image_fields(prefix: str, cfg) -> None:
    """Check ``image_size``, ``channels``, ``patch_size``, ``num_classes``, ``n_layers``,
    ``moe_every`` and ``moe_last`` of a vision config (errors name ``prefix.field``, or the bare
    field when ``prefix`` is empty: a run config's section then puts its path in front)."""
    prefix = f"{prefix}." if prefix else ""
    for name in ("image_size", "channels", "patch_size", "num_classes", "n_layers", "moe_every"):
        check_positive_int(f"{prefix}{name}", getattr(cfg, name))
    last = cfg.moe_last
    if isinstance(last, bool) or not isinstance(last, int) or last < 0:
        raise ValueError(f"{prefix}moe_last={last!r} must be an int >= 0 (0: every MoE site)")
    if cfg.image_size % cfg.patch_size:
        raise ValueError(
            f"{prefix}patch_size={cfg.patch_size} must divide {prefix}image_size="
            f"{cfg.image_size} (the image is cut into whole patches)"
        )


def moe_sites(n_layers: int, moe_every: int, moe_last: int) -> list[bool]:
    """Which of ``n_layers`` blocks hold MoE layers: every ``moe_every``-th block (blocks
    ``moe_every - 1``, ``2 * moe_every - 1``, ...; V-MoE's "Every-2" is ``moe_every=2``), and of
    those only the last ``moe_last`` when it is > 0 (V-MoE's "Last-n", Riquelme et al. 2021,
    §3; Sparse-MLP's sparse blocks at the end of the network)."""
    sites = [(i + 1) % moe_every == 0 for i in range(n_layers)]
    if moe_last:
        keep = [i for i, s in enumerate(sites) if s][-moe_last:]
        sites = [i in keep for i in range(n_layers)]
    return sites


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch_size`` patches, each linearly projected to ``d_model`` (a
    convolution with stride = kernel = patch size, as in ViT and MLP-Mixer)."""

    def __init__(self, channels: int, patch_size: int, d_model: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(channels, d_model, patch_size, stride=patch_size)

    def forward(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, P, D), patches in row-major order."""
        return self.proj(images_BCHW).flatten(2).transpose(1, 2)
