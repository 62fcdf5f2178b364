"""The gate product ``x @ w.T`` of learned routers, in the router's dtype, and its fast-path seam.

Routers compute their logits in ``router_dtype`` (fp32 by default, also for bf16 activations:
Switch Transformer's selective precision, Fedus et al. 2021, section 2.4). ``cast_linear``
casts x and w for the product only and keeps them in their own dtypes for backward, so bf16
activations keep no (T, D) fp32 copy alive.

A device kernel package (moesaic/kernels/) may register a faster gate product with
``register_gate_product``; routing itself never imports one. A registered product returns None
for inputs it does not handle, and the plain product runs.

Shape legend (docs/shapes.md): T tokens, D model dim, E experts.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn import functional as F

__all__ = ["cast_linear", "gate_product", "register_gate_product", "Matmul"]

Matmul = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
GateProduct = Callable[[torch.Tensor, torch.Tensor, torch.dtype], "torch.Tensor | None"]
_PRODUCTS: list[GateProduct] = []


def register_gate_product(fn: GateProduct) -> GateProduct:
    """Add ``fn(x_TD, w_ED, dtype) -> logits (T, E) or None`` before the plain product."""
    if fn not in _PRODUCTS:
        _PRODUCTS.append(fn)
    return fn


class _CastLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, w_ED, dtype, mm):
        ctx.save_for_backward(x_TD, w_ED)
        ctx.dtype, ctx.mm = dtype, mm
        return mm(x_TD.to(dtype), w_ED.to(dtype).t())

    @staticmethod
    def backward(ctx, g_TE):
        x_TD, w_ED = ctx.saved_tensors
        dtype, mm = ctx.dtype, ctx.mm
        g_TE = g_TE.to(dtype)
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gx = mm(g_TE, w_ED.to(dtype)).to(x_TD.dtype)
        if ctx.needs_input_grad[1]:
            gw = mm(g_TE.t(), x_TD.to(dtype)).to(w_ED.dtype)
        return gx, gw, None, None


def cast_linear(
    x_TD: torch.Tensor, w_ED: torch.Tensor, dtype: torch.dtype, mm: Matmul = torch.mm
) -> torch.Tensor:
    """``x @ w.T`` computed in ``dtype`` with the matrix product ``mm``; backward casts again
    instead of keeping cast copies."""
    return _CastLinear.apply(x_TD, w_ED, dtype, mm)


def gate_product(x_TD: torch.Tensor, w_ED: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Logits (T, E) = ``x @ w.T`` in ``dtype``, on a registered fast path when one applies."""
    for fn in _PRODUCTS:
        y = fn(x_TD, w_ED, dtype)
        if y is not None:
            return y
    if x_TD.dtype == w_ED.dtype == dtype:
        return F.linear(x_TD, w_ED)
    return cast_linear(x_TD, w_ED, dtype)
