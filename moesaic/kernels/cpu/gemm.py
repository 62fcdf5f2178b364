"""The CPU experts' matrix products: oneDNN's fused linear where it runs, else torch.mm.

On CPU, ``torch.mm`` in fp32 runs MKL's sgemm, which on some CPUs takes a generic code path,
while oneDNN (bundled with every x86 torch wheel, reached through
``torch.ops.mkldnn._linear_pointwise``, the op torch.compile's CPU backend emits) runs kernels
for the CPU's own vector width with the same fp32 accuracy. oneDNN also fuses the expert
activation into the first product and, for SwiGLU, the gate product ``(x w3) * silu(x w1)``.
Which one runs is decided per CPU (``moesaic.kernels.cpu.capability``) and per shape by the
backend's ``CpuTuning``; docs/performance.md has the measurements behind each rule.

oneDNN repacks the weight on every call, so products of few rows stay on torch.mm. For serving,
packed copies skip the repacking (moesaic/kernels/cpu/packing.py).

The experts keep each weight transposed in memory (``Experts``' (K, N) weights are views of
contiguous (N, K) matrices, nn.Linear's (out, in) order), the operand layout oneDNN's linear
takes. Forward-only fp32 products of a few dozen rows may run swapped, ``(b^T a^T)^T``: the
weight is the left operand, read in place, and only the token rows are repacked; the result is a
transposed view. Swapped, the rows become the product's columns, which oneDNN computes in blocks
of one vector, so only row counts at or just under a multiple of the block swap. The weight
gradients have the weights' layout; ``matmul`` writes a transposed ``out`` as the product
``b^T a^T`` in the output's own row order.

Every function takes ``onednn``: a ``CpuTuning`` to run on oneDNN under its thresholds, or None
for torch.mm.

Shape legend (docs/shapes.md): M rows of a product, K its inner size, N its output columns.
"""

from __future__ import annotations

import functools

import torch
from torch.nn import functional as F

from moesaic.kernels.cpu.capability import cpu_capability
from moesaic.kernels.cpu.tuning import CpuTuning

__all__ = [
    "ACT",
    "onednn_available",
    "use_onednn",
    "gate_onednn",
    "packable",
    "matmul",
    "matmul_mul",
    "matmul_add",
    "Packed",
]

# activation name -> oneDNN post-op (attr, algorithm); applied after the bias
_FUSED = {
    "none": ("none", None),
    "gelu": ("gelu", "none"),
    "gelu_tanh": ("gelu", "tanh"),
    "relu": ("relu", None),
    "silu": ("swish", None),
}
ACT = {
    "gelu": F.gelu,
    "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


def onednn_available(dtype: torch.dtype = torch.float32) -> bool:
    """oneDNN's fused linear runs, and matches ``F.linear``, in ``dtype`` on this CPU and torch
    build (probed once: ``moesaic.kernels.cpu.cpu_capability``). bf16 needs AVX-512 BW/VL/DQ or
    AVX-NE-CONVERT on x86; on other CPUs the products stay on torch.mm."""
    cap = cpu_capability()
    if dtype == torch.bfloat16:
        return cap.onednn_bf16
    return dtype == torch.float32 and cap.onednn_fp32


def use_onednn(tuning: CpuTuning, t: torch.Tensor, weight_numel: int) -> bool:
    """Whether ``tuning.gemm`` runs the products of ``t`` with expert weights of
    ``weight_numel`` elements (D * F) on oneDNN: CPU tensors in a dtype oneDNN runs on this CPU;
    "auto" takes fp32 with weights of at least ``min_weight`` elements on CPUs whose instruction
    set is in ``auto_onednn_isas`` and vendor in ``auto_onednn_vendors``, "onednn" fp32 and bf16
    of any size. Where the CPU cannot run a requested path, torch.mm computes the same
    products."""
    if tuning.gemm == "torch" or t.device.type != "cpu" or not onednn_available(t.dtype):
        return False
    if tuning.gemm == "onednn":
        return True
    cap = cpu_capability()
    return (
        t.dtype == torch.float32
        and weight_numel >= tuning.min_weight
        and cap.isa in tuning.auto_onednn_isas
        and cap.vendor in tuning.auto_onednn_vendors
    )


def gate_onednn(tuning: CpuTuning, x_TD: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether a router's gate product on ``x`` computed in ``dtype`` runs on oneDNN: fp32 on
    CPU with at least ``gate_min_rows`` tokens, on a torch with oneDNN, on a CPU of a vendor in
    ``gate_vendors``."""
    return (
        dtype == torch.float32
        and x_TD.device.type == "cpu"
        and x_TD.shape[0] >= tuning.gate_min_rows
        and onednn_available()
        and cpu_capability().vendor in tuning.gate_vendors
    )


def packable(tuning: CpuTuning, w: torch.Tensor, weight_numel: int) -> bool:
    """Whether forward-only products with weights like ``w`` may run on packed oneDNN copies:
    fp32 where ``tuning`` runs them on oneDNN anyway, and bf16 under the same size rule
    (unpacked, bf16 stays on torch.mm, which calls oneDNN's matmul itself; packed, oneDNN skips
    repacking the weights)."""
    if w.dtype == torch.bfloat16 and tuning.gemm == "auto":
        cpu = w.device.type == "cpu" and onednn_available(w.dtype)
        return cpu and weight_numel >= tuning.min_weight
    return use_onednn(tuning, w, weight_numel)


class Packed:
    """A weight ``plain`` (K, N) with a copy ``onednn`` in oneDNN's blocked layout (opaque)."""

    __slots__ = ("plain", "onednn")

    def __init__(self, plain: torch.Tensor, onednn: torch.Tensor) -> None:
        self.plain, self.onednn = plain, onednn


def _split(b: torch.Tensor | Packed) -> tuple[torch.Tensor, torch.Tensor]:
    """(the plain (K, N) weight, the weight operand oneDNN's linear takes: the packed copy, or
    the plain weight viewed as (N, K))."""
    return (b.plain, b.onednn) if isinstance(b, Packed) else (b, b.t())


def _fits(tuning: CpuTuning, a_MK: torch.Tensor, b_KN: torch.Tensor) -> bool:
    return a_MK.shape[0] >= tuning.min_rows and a_MK.dtype == b_KN.dtype


def _transposed(t: torch.Tensor) -> bool:
    """``t`` (2-D) is a view of a contiguous matrix's transpose and not contiguous itself."""
    return t.dim() == 2 and t.t().is_contiguous() and not t.is_contiguous()


def _swaps(a_MK: torch.Tensor, b_KN: torch.Tensor | Packed, onednn: CpuTuning | None) -> bool:
    """Whether a product allowed to swap does: fp32 on oneDNN, b stored transposed, rows within
    ``swap_rows`` and at most ``swap_pad`` short of a multiple of ``swap_block``."""
    if onednn is None or isinstance(b_KN, Packed):
        return False
    M, (lo, hi) = a_MK.shape[0], onednn.swap_rows
    if not lo <= M <= hi or -M % onednn.swap_block > onednn.swap_pad:
        return False
    return a_MK.dtype == torch.float32 and _transposed(b_KN) and _fits(onednn, a_MK, b_KN)


def _swapped(
    a_MK: torch.Tensor,
    b_KN: torch.Tensor,
    bias_N: torch.Tensor | None,
    act: str,
    other_MN: torch.Tensor | None = None,
) -> torch.Tensor:
    """``act(a @ b + bias)``, times ``other`` when given, computed on oneDNN as the (N, M)
    product ``b^T a^T`` with the weight ``b^T`` (contiguous) as the left operand; returns its
    (M, N) transposed view."""
    w_NK = b_KN.t()
    if bias_N is None and other_MN is not None:
        y_NM = torch.ops.mkldnn._linear_pointwise.binary(
            w_NK, other_MN.t().contiguous(), a_MK, None, "mul"
        )
        return y_NM.t()
    if bias_N is None:
        attr, algorithm = _FUSED[act]
        return torch.ops.mkldnn._linear_pointwise(w_NK, a_MK, None, attr, [], algorithm).t()
    y_NM = torch.ops.mkldnn._linear_pointwise(w_NK, a_MK, None, "none", [], None)
    y_NM.add_(bias_N.unsqueeze(1))
    if act != "none":
        y_NM = ACT[act](y_NM)
    if other_MN is not None:
        y_NM.mul_(other_MN.t())
    return y_NM.t()


def matmul(
    a_MK: torch.Tensor,
    b_KN: torch.Tensor | Packed,
    bias_N: torch.Tensor | None = None,
    *,
    act: str = "none",
    onednn: CpuTuning | None = None,
    out: torch.Tensor | None = None,
    swap: bool = False,
) -> torch.Tensor:
    """``act(a @ b + bias)`` (M, N), written into ``out`` when given. ``onednn`` runs it as one
    fused oneDNN op when the product has at least ``min_rows`` rows (on ``b``'s packed copy when
    it is ``Packed``). A transposed ``out`` (a weight gradient in the experts' layout) receives
    ``b^T a^T`` in its own row-major order. ``swap`` lets a product with rows within
    ``swap_rows`` run as ``b^T a^T`` (module docstring); the result is then a transposed
    view."""
    if out is not None and _transposed(out) and bias_N is None and act == "none":
        # oneDNN reads a transposed left operand slowly, so b^T (N, K) is copied into row
        # order first (weight-gradient products)
        a_NK = _split(b_KN)[0].t()
        a_NK = a_NK.contiguous() if onednn is not None else a_NK
        matmul(a_NK, a_MK.t(), onednn=onednn, out=out.t())
        return out
    if swap and _swaps(a_MK, b_KN, onednn):
        y = _swapped(a_MK, b_KN, bias_N, act)
        return y if out is None else out.copy_(y)
    b_KN, w = _split(b_KN)
    if onednn is not None and _fits(onednn, a_MK, b_KN):
        attr, algorithm = _FUSED[act]
        y = torch.ops.mkldnn._linear_pointwise(a_MK, w, bias_N, attr, [], algorithm)
        return y if out is None else out.copy_(y)
    if bias_N is None:
        y = torch.mm(a_MK, b_KN, out=out if act == "none" else None)
    else:
        y = torch.addmm(bias_N, a_MK, b_KN, out=out if act == "none" else None)
    if act == "none":
        return y
    y = ACT[act](y)
    return y if out is None else out.copy_(y)


def matmul_mul(
    a_MK: torch.Tensor,
    b_KN: torch.Tensor | Packed,
    bias_N: torch.Tensor | None,
    other_MN: torch.Tensor,
    *,
    onednn: CpuTuning | None = None,
    swap: bool = False,
) -> torch.Tensor:
    """``(a @ b + bias) * other``: SwiGLU's gate product, fused on oneDNN; ``swap`` as in
    ``matmul``."""
    if swap and _swaps(a_MK, b_KN, onednn):
        return _swapped(a_MK, b_KN, bias_N, "none", other_MN)
    plain, w = _split(b_KN)
    if onednn is not None and _fits(onednn, a_MK, plain):
        return torch.ops.mkldnn._linear_pointwise.binary(a_MK, other_MN, w, bias_N, "mul")
    return matmul(a_MK, b_KN, bias_N).mul_(other_MN)


def matmul_add(
    a_MK: torch.Tensor,
    b_KN: torch.Tensor,
    other_MN: torch.Tensor,
    *,
    onednn: CpuTuning | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``a @ b + other``, written into ``out`` when given; fused on oneDNN."""
    if onednn is not None and _fits(onednn, a_MK, b_KN):
        y = torch.ops.mkldnn._linear_pointwise.binary(a_MK, other_MN, b_KN.t(), None, "add")
        return y if out is None else out.copy_(y)
    return torch.addmm(other_MN, a_MK, b_KN, out=out)
