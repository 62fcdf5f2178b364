"""Backend ``"grouped"``: one ``torch._grouped_mm`` per projection over all experts.

Its fast path is CUDA with bf16 operands and rows 16-byte aligned ("auto" picks it there).

Shape legend (docs/shapes.md): A assignments grouped by expert, D model dim, F expert hidden.
"""

from __future__ import annotations

import torch

from moesaic.experts.backend import ExpertBackend, register_backend

__all__ = ["GroupedMM"]


class GroupedMM(ExpertBackend):
    name = "grouped"

    def supports(self, experts, x_AD: torch.Tensor) -> bool:
        return (
            x_AD.is_cuda
            and hasattr(torch, "_grouped_mm")
            and x_AD.dtype == experts.w1.dtype == torch.bfloat16
            and experts.d_model % 8 == 0
            and experts.d_ff % 8 == 0
        )

    def forward(self, experts, x_AD: torch.Tensor, counts: list[int]) -> torch.Tensor:
        counts_E = torch.tensor(counts, device=x_AD.device)
        offs = counts_E.cumsum(0).to(torch.int32)
        # expert of each row, only to index the biases
        expert_A = torch.repeat_interleave(torch.arange(len(counts), device=x_AD.device), counts_E)

        def linear(x, w, b):
            y = torch._grouped_mm(x, w, offs=offs)
            return y if b is None else y + b[expert_A]

        h = experts.act(linear(x_AD, experts.w1, experts.b1))
        if experts.w3 is not None:
            h = h * linear(x_AD, experts.w3, experts.b3)
        return linear(h, experts.w2, experts.b2)


register_backend(GroupedMM())
