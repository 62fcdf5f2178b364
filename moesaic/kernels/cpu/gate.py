"""Routers' gate products on oneDNN (fp32 on CPU, long inputs), registered with routing.

Shape legend (docs/shapes.md): T tokens, D model dim, E experts.
"""

from __future__ import annotations

import torch

from moesaic.kernels.cpu.gemm import gate_onednn, matmul
from moesaic.kernels.cpu.tuning import DEFAULT_TUNING
from moesaic.routing.gate import cast_linear, register_gate_product

__all__ = ["onednn_gate_product"]


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # oneDNN reads a transposed left operand slowly (the weight gradient's g^T)
    return matmul(a.contiguous(), b, onednn=DEFAULT_TUNING)


@register_gate_product
def onednn_gate_product(
    x_TD: torch.Tensor, w_ED: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor | None:
    """``x @ w.T`` in ``dtype`` on oneDNN where ``gate_onednn`` says so, else None."""
    if not gate_onednn(DEFAULT_TUNING, x_TD, dtype):
        return None
    return cast_linear(x_TD, w_ED, dtype, _mm)
