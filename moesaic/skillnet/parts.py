"""Building blocks of SkillNet: modality front-ends, skill-specific linear maps, trunk blocks.

Shape legend (docs/shapes.md): B batch, S sequence (tokens per example), D model dim, T tokens
(B * S), E skills, O output width, F frames, M mel bins, H / W image height / width.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from moesaic.config import MoEConfig
from moesaic.context import current_context
from moesaic.layer import MoE
from moesaic.routing.task import SkillRouter

__all__ = ["BytesFrontEnd", "PatchFrontEnd", "SoundFrontEnd", "SkillLinear", "SkillBlock"]


class BytesFrontEnd(nn.Module):
    """Byte tokens (text, code) -> embeddings. Byte 0 is padding and masked out.

    Shape: x uint8/long (B, S) -> (tokens (B, S, D), mask bool (B, S)).
    """

    def __init__(self, d_model: int, max_len: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, d_model)
        self.pos = nn.Parameter(torch.randn(max_len, d_model) * 0.02)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.token_targets(x)
        mask = x != 0
        mask[:, 0] = True  # an empty text still has one token to pool
        return self.embed(x) + self.pos[: x.shape[1]], mask

    def token_targets(self, x: torch.Tensor) -> torch.Tensor:
        """The byte ids the tokens stand for: long (B, S), where the columns that are padding in
        every row are dropped (masked tokens change nothing)."""
        x = x.long()
        width = int((x != 0).any(0).nonzero().max()) + 1 if bool((x != 0).any()) else 1
        if width > self.pos.shape[0]:
            raise ValueError(
                f"input holds {width} bytes per row, more than this front-end's "
                f"max_len={self.pos.shape[0]} (model.text_len / model.code_len)"
            )
        return x[:, :width]

    def positions(self, S: int) -> torch.Tensor:
        """The position embedding of each of S tokens: (S, D)."""
        return self.pos[:S]


class PatchFrontEnd(nn.Module):
    """Images (B, H, W) or clips (B, F, H, W) of uint8 pixels -> patch embeddings, with learned
    spatial and (for clips) time positions. A token covers ``patch`` x ``patch`` pixels of
    ``tubelet`` consecutive frames (ViViT's tubelets). Shape: -> (B, F / tubelet * (H / patch)
    * (W / patch), D)."""

    def __init__(
        self, d_model: int, size: int, patch: int, frames: int = 1, tubelet: int = 1
    ) -> None:
        super().__init__()
        if size % patch or frames % tubelet:
            raise ValueError(
                f"size={size} must be divisible by patch={patch} and frames={frames} by "
                f"tubelet={tubelet}"
            )
        self.steps, self.tubelet = frames // tubelet, tubelet
        self.conv = nn.Conv2d(tubelet, d_model, patch, stride=patch)
        self.pos = nn.Parameter(torch.randn((size // patch) ** 2, d_model) * 0.02)
        self.time_pos = nn.Parameter(torch.randn(self.steps, 1, d_model) * 0.02)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, (H, W) = x.shape[0], x.shape[-2:]
        x_NtHW = x.float().div(255).reshape(B * self.steps, self.tubelet, H, W)
        p_NDP = self.conv(x_NtHW).flatten(2)
        p_BFPD = p_NDP.transpose(1, 2).reshape(B, self.steps, -1, p_NDP.shape[1])
        tokens = (p_BFPD + self.pos + self.time_pos).reshape(B, -1, p_NDP.shape[1])
        return tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=x.device)

    def token_targets(self, x: torch.Tensor) -> torch.Tensor:
        """The pixels (0..1) each token covers, in token order: (B, S, tubelet * patch**2)."""
        B, (H, W) = x.shape[0], x.shape[-2:]
        x_NtHW = x.float().div(255).reshape(B * self.steps, self.tubelet, H, W)
        patch = self.conv.kernel_size[0]
        p_NKL = F.unfold(x_NtHW, patch, stride=patch)
        return p_NKL.transpose(1, 2).reshape(B, -1, p_NKL.shape[1])

    def positions(self, S: int) -> torch.Tensor:
        """The position embedding (space + time) of each of the S tokens: (S, D)."""
        return (self.pos + self.time_pos).reshape(-1, self.pos.shape[1])[:S]


class SoundFrontEnd(nn.Module):
    """Log-mel spectrogram frames -> tokens of ``stack`` consecutive frames each, per-example
    standardised. Shape: x (B, F, M) -> (B, F / stack, D)."""

    def __init__(self, d_model: int, frames: int, n_mels: int, stack: int = 2) -> None:
        super().__init__()
        if frames % stack:
            raise ValueError(f"sound_frames={frames} must be divisible by sound_stack={stack}")
        self.stack = stack
        self.proj = nn.Linear(n_mels * stack, d_model)
        self.pos = nn.Parameter(torch.randn(frames // stack, d_model) * 0.02)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.proj(self.token_targets(x)) + self.pos
        return tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=x.device)

    def token_targets(self, x: torch.Tensor) -> torch.Tensor:
        """The standardised frames each token stacks: (B, S, stack * M)."""
        x = x.float()
        x = (x - x.mean(dim=(1, 2), keepdim=True)) / (x.std(dim=(1, 2), keepdim=True) + 1e-5)
        return x.reshape(x.shape[0], -1, self.stack * x.shape[2])

    def positions(self, S: int) -> torch.Tensor:
        """The position embedding of each of the S tokens: (S, D)."""
        return self.pos[:S]


class SkillLinear(nn.Module):
    """A linear map with one weight per skill, ``y = mean over active skills s of x W_s + b_s``;
    the ``skill`` router reads the active skills from ``ms.routing_context(task=...)``.

    Parameters ``weight`` (E, D, O) and ``bias`` (E, O). Shape: x (..., D) -> (..., O).
    """

    def __init__(self, d_in: int, d_out: int, task_skills: Sequence[Sequence[int]]) -> None:
        super().__init__()
        E = 1 + max(max(s) for s in task_skills)
        self.router = SkillRouter(d_in, E, task_skills=task_skills)
        self.weight = nn.Parameter(torch.empty(E, d_in, d_out))
        self.bias = nn.Parameter(torch.empty(E, d_out))
        bound = d_in**-0.5  # each skill like a fresh nn.Linear
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_TD = x.reshape(-1, x.shape[-1])
        r = self.router(x_TD, current_context())
        # (T, E) combine weights from the flat assignments: a few thousand scalars, where a
        # sort-and-scatter dispatch of (T, 3D) rows measured slower at these small widths
        w_TE = x_TD.new_zeros(x_TD.shape[0], self.weight.shape[0])
        w_TE = w_TE.index_put((r.token, r.expert), r.weight.to(x.dtype), accumulate=True)
        y_TO = None
        for e in torch.unique(r.expert).tolist():  # inactive skills stay out of the graph
            y_e = torch.addmm(self.bias[e], x_TD, self.weight[e]) * w_TE[:, e : e + 1]
            y_TO = y_e if y_TO is None else y_TO + y_e
        return y_TO.reshape(*x.shape[:-1], -1)


class SkillBlock(nn.Module):
    """Pre-norm Transformer block (bidirectional, padding-masked) whose Q/K/V projection and/or
    FFN hold one copy per skill. A site without skills gets a single copy shared by every task,
    built the same way, so a dense model and a skill model activate the same parameters.

    Shape: x (B, S, D), mask bool (B, S) -> (B, S, D).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_ff: int,
        activation: str,
        skill_table: Sequence[Sequence[int]],
        sites: frozenset[str],
    ) -> None:
        super().__init__()
        shared = [[0] for _ in skill_table]
        qkv_table = skill_table if "attn_qkv" in sites else shared
        ffn_table = skill_table if "ffn" in sites else shared
        self.n_heads = n_heads
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv = SkillLinear(d_model, 3 * d_model, qkv_table)
        self.proj = nn.Linear(d_model, d_model)
        skills = MoEConfig(
            d_model=d_model,
            d_ff=d_ff,
            num_experts=1 + max(max(s) for s in ffn_table),
            router="skill",
            activation=activation,
            aux_loss_weight=0.0,
            router_options={"task_skills": ffn_table},
        )
        self.ffn = MoE(skills)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, S, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, S, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        x = x + self.proj(a.transpose(1, 2).reshape(B, S, D))
        return x + self.ffn(self.norm2(x))
