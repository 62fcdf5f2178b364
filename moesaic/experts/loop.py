"""Backend ``"torch"``: the experts as a plain loop of ``F.linear`` calls under autograd.

This is the definition of what an ``Experts`` module computes, kept short enough to read at a
glance; every other backend is tested against it, and it runs wherever nothing faster applies
(any device, any dtype, any mode or tracer).

Shape legend (docs/shapes.md): A assignments grouped by expert, D model dim, F expert hidden.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from moesaic.experts.backend import ExpertBackend, register_backend

__all__ = ["TorchLoop"]


def _at(b: torch.Tensor | None, e: int) -> torch.Tensor | None:
    return None if b is None else b[e]


class TorchLoop(ExpertBackend):
    name = "torch"

    def forward(self, experts, x_AD: torch.Tensor, counts: list[int]) -> torch.Tensor:
        act = experts.act
        y = []
        for e, x in enumerate(x_AD.split(counts)):
            if x.shape[0] == 0:
                continue
            # w1[e] is (D, F): .t() is the (out, in) matrix F.linear takes
            h = act(F.linear(x, experts.w1[e].t(), _at(experts.b1, e)))
            if experts.w3 is not None:  # SwiGLU: silu(x w1) * (x w3)
                h = h * F.linear(x, experts.w3[e].t(), _at(experts.b3, e))
            if experts.dropout and experts.training:  # expert dropout (Fedus et al. 2022, §4.2)
                h = F.dropout(h, experts.dropout)
            y.append(F.linear(h, experts.w2[e].t(), _at(experts.b2, e)))
        return torch.cat(y) if y else x_AD.new_empty(0, experts.d_model)


register_backend(TorchLoop())
