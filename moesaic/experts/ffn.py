"""Stacked expert FFNs run on contiguous per-expert slices.

Shape legend (docs/shapes.md): A assignments (sorted by expert), D model dim, F expert hidden,
E experts.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from moesaic._validate import check_choice, check_positive_int, check_tokens
from moesaic.experts.gradpool import GradPool
from moesaic.experts.sliced import sliced_ffn

__all__ = ["Experts", "ACTIVATIONS"]

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
    "swiglu": F.silu,  # silu(x w1) * (x w3), Shazeer 2020 "GLU Variants Improve Transformer"
}
IMPLS = ("auto", "loop", "grouped")


class Experts(nn.Module):
    """E independent FFNs ``y = act(x w1[e]) w2[e]`` (swiglu: ``(silu(x w1[e]) * x w3[e]) w2[e]``).

    Args:
        num_experts: E.
        d_model: D.
        d_ff: F, hidden width of each expert.
        activation: "gelu" | "relu" | "silu" | "swiglu".
        impl: "loop" runs one matmul per expert on its slice; "grouped" one ``torch._grouped_mm``
            per projection; "auto" takes grouped for bf16 on CUDA and the loop elsewhere (on CPU
            the loop is faster, measured in benchmarks/moe_layer.py).

    Shape:
        forward(x_AD, counts): x (A, D) grouped by expert with ``counts[e]`` rows for expert e,
        sum(counts) == A. Output (A, D).

    Parameters ``w1`` (E, D, F), ``w2`` (E, F, D) and for swiglu ``w3`` (E, D, F) are public names.
    """

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        d_ff: int,
        activation: str = "gelu",
        *,
        impl: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("num_experts", num_experts), ("d_model", d_model), ("d_ff", d_ff)):
            check_positive_int(name, value)
        check_choice("activation", activation, ACTIVATIONS)
        check_choice("impl", impl, IMPLS)
        self.num_experts, self.d_model, self.d_ff = num_experts, d_model, d_ff
        self.activation, self.impl = activation, impl
        self.act = ACTIVATIONS[activation]
        kw = {"device": device, "dtype": dtype}
        self.w1 = nn.Parameter(torch.empty(num_experts, d_model, d_ff, **kw))
        self.w2 = nn.Parameter(torch.empty(num_experts, d_ff, d_model, **kw))
        self.w3 = (
            nn.Parameter(torch.empty(num_experts, d_model, d_ff, **kw)) if self.gated else None
        )
        self.reset_parameters()
        self.grad_pool = GradPool()

    @property
    def gated(self) -> bool:
        return self.activation == "swiglu"

    def reset_parameters(self) -> None:
        # Each expert like a fresh nn.Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), so an MoE and a
        # dense FFN of the same widths start at the same scale.
        for w, fan_in in ((self.w1, self.d_model), (self.w2, self.d_ff), (self.w3, self.d_model)):
            if w is not None:
                bound = 1.0 / math.sqrt(fan_in)
                nn.init.uniform_(w, -bound, bound)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, d_model={self.d_model}, d_ff={self.d_ff}, "
            f"activation={self.activation!r}, impl={self.impl!r}"
        )

    def forward(self, x_AD: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Expert e's FFN on rows ``sum(counts[:e]) .. sum(counts[:e + 1])`` of ``x_AD`` (A, D)."""
        self._check(x_AD, counts)
        if self._use_grouped(x_AD):
            return self._grouped(x_AD, counts)
        return self._loop(x_AD, counts)

    def _check(self, x_AD: torch.Tensor, counts: list[int]) -> None:
        check_tokens("x_AD", x_AD, self.d_model, self.w1)
        E = self.w1.shape[0]  # the local experts under expert parallelism
        if isinstance(counts, torch.Tensor):
            counts = counts.tolist()
        if (
            not isinstance(counts, (list, tuple))
            or len(counts) != E
            or not all(isinstance(c, int) and c >= 0 for c in counts)
        ):
            raise ValueError(f"counts={counts!r} must be {E} ints >= 0 (one per expert)")
        if sum(counts) != x_AD.shape[0]:
            raise ValueError(f"sum(counts)={sum(counts)} must equal x_AD.shape[0]={x_AD.shape[0]}")

    def _use_grouped(self, x_AD: torch.Tensor) -> bool:
        if self.impl != "auto":
            return self.impl == "grouped"
        # torch._grouped_mm's fast path: CUDA, bf16 operands, rows 16-byte aligned
        return (
            x_AD.is_cuda
            and hasattr(torch, "_grouped_mm")
            and x_AD.dtype == self.w1.dtype == torch.bfloat16
            and self.d_model % 8 == 0
            and self.d_ff % 8 == 0
        )

    def _loop(self, x_AD: torch.Tensor, counts: list[int]) -> torch.Tensor:
        w1, w2, w3 = self.w1, self.w2, self.w3
        if self.grad_pool is not None and torch.is_grad_enabled():
            for w in (w1, w2, w3):
                if w is not None:
                    self.grad_pool.watch(w)
        if torch.is_autocast_enabled(x_AD.device.type):
            # the Function's matmuls would each be autocast; cast once here instead
            dtype = torch.get_autocast_dtype(x_AD.device.type)
            x_AD, w1, w2 = x_AD.to(dtype), w1.to(dtype), w2.to(dtype)
            w3 = w3.to(dtype) if w3 is not None else None
        with torch.autocast(x_AD.device.type, enabled=False):
            return sliced_ffn(x_AD, w1, w2, w3, counts, self.activation, self.grad_pool)

    def _grouped(self, x_AD: torch.Tensor, counts: list[int]) -> torch.Tensor:
        offs = torch.tensor(counts, device=x_AD.device).cumsum(0).to(torch.int32)
        h = self.act(torch._grouped_mm(x_AD, self.w1, offs=offs))
        if self.w3 is not None:
            h = h * torch._grouped_mm(x_AD, self.w3, offs=offs)
        return torch._grouped_mm(h, self.w2, offs=offs)
