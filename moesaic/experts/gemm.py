"""The experts' matrix products: oneDNN on CPU where torch ships it, else torch.mm.

On CPU, ``torch.mm`` in fp32 runs MKL's sgemm. On the AMD EPYC machines this project measures on
(AVX-512), MKL takes its generic AVX2 code path and reaches ~100 GFLOP/s per core, while oneDNN
(bundled with every x86 torch wheel, reached through ``torch.ops.mkldnn._linear_pointwise``, the
op torch.compile's CPU backend emits) runs AVX-512 kernels at ~210 GFLOP/s on the same products,
with the same fp32 accuracy (benchmarks/gemm.py measures both). oneDNN also fuses the expert
activation into the first product and, for SwiGLU, the gate product ``(x w3) * silu(x w1)``.

oneDNN repacks the weight on every call (~120 us for a 512 x 2048 fp32 matrix), so products with
fewer than ``MIN_ROWS`` rows (decoding a token or two) stay on torch.mm, which is faster there,
and so do experts with fewer than ``MIN_WEIGHT`` weights per projection under "auto".
``Experts(gemm="torch")`` keeps every product on torch.mm. For serving, ``PackCache`` keeps
packed copies of the weights so forward-only products skip the repacking
(``Experts.pack_for_inference``), at the price of a second copy of the expert weights.

The experts keep each weight transposed in memory (``Experts``' (K, N) weights are views of
contiguous (N, K) matrices, nn.Linear's (out, in) order), which is the operand layout oneDNN's
linear takes: its per-call repacking then reads the weight in row order instead of gathering it
through a transposed view. Measured on the expert phase alone (2 threads, 32 experts of D=512,
F=2048, forward-only, fp32): 64 rows per expert 30.4 -> 27.3 ms, 256 rows 85.1 -> 81.8 ms.
Forward-only fp32 products of a few dozen rows may run swapped, ``(b^T a^T)^T``: the weight is
the left operand, read in place, and only the token rows are repacked; the result is a
transposed view. Swapped, the rows become the product's columns, which oneDNN computes in blocks
of 16, so only row counts at or just under a multiple of 16 swap (``SWAP_ROWS``, ``SWAP_PAD``):
a few percent off those products, while the others would take up to a third longer. The weight
gradients have the weights' layout; ``matmul`` writes a transposed ``out`` as the product
``b^T a^T`` in the output's own row order. Training steps measured the same in both layouts.

Shape legend (docs/shapes.md): M rows of a product, K its inner size, N its output columns.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from torch.nn import functional as F

from moesaic.kernels.cpu.capability import cpu_capability

__all__ = [
    "ACT",
    "BACKENDS",
    "GATE_MIN_ROWS",
    "MIN_ROWS",
    "MIN_WEIGHT",
    "AUTO_ONEDNN_ISAS",
    "SWAP_ROWS",
    "SWAP_BLOCK",
    "SWAP_PAD",
    "onednn_available",
    "use_onednn",
    "gate_onednn",
    "packable",
    "matmul",
    "matmul_mul",
    "matmul_add",
    "Packed",
    "PackCache",
]

BACKENDS = ("auto", "onednn", "torch")
# oneDNN's time over torch.mm's, K=512, N=2048, fp32, the weight in the experts' layout
# (benchmarks/gemm.py products), 1 thread / 2 threads: 1 row 1.03 / 0.71, 2 rows 1.15 / 0.70,
# 4 rows 0.72 / 0.45, 64 rows 0.47 / 0.46 (row-major weights: 1 row 2.19 / 1.37)
MIN_ROWS = 4
# Smaller experts stay on torch.mm: training steps (fwd+bwd, 2 threads, T=8192, top-1, a new
# input every step so that the rows per expert keep changing), oneDNN's time over torch.mm's
# (benchmarks/gemm.py sizes): D*F = 64*256 1.64, 128*512 1.16, 256*1024 0.74, 512*2048 0.68.
# oneDNN builds (JIT compiles) a kernel for every new row count, ~0.4 ms each, and small
# products never win it back.
MIN_WEIGHT = 256 * 1024
# "auto" puts expert products on oneDNN only where its kernels were measured faster than
# torch.mm for training steps: AVX-512 CPUs. On an AVX2-only AMD EPYC every size measured slower
# on oneDNN (docs/performance.md, "The GEMM library by CPU"), so there "auto" is torch.mm.
AUTO_ONEDNN_ISAS = ("AVX512",)
# Forward-only fp32 products on oneDNN with rows in SWAP_ROWS (inclusive) and at most SWAP_PAD
# rows short of a multiple of SWAP_BLOCK run swapped (b^T a^T, the weight as the left operand,
# read in place). Swapped, the rows are the product's columns, computed in blocks of 16 (one
# AVX-512 fp32 vector): 1 thread, K=512, N=2048 with GELU, 64 rows 0.77 ms swapped against 0.80
# unswapped, 65 rows 0.92 against 0.79 (as long as 80 rows swapped). Swapped over unswapped
# time, 1 thread, by rows (padding to 16): 16 (0) 0.81-0.84, 31 (1) 0.85-0.91, 47 (1)
# 0.88-0.95, 64 (0) 0.88-0.98, 62 (2) 0.94-1.00, 24 (8) 1.01-1.08, 66 (14) 1.06-1.15; from
# 144 rows on 0.98-1.05 whatever the padding. The layer's forward, T=2048, E=32, k=1 (41-91 rows
# per expert), 2 threads, fp32, against never swapping: always swapping 1.02-1.09x, this rule
# 0.93-1.01x (median 0.98x). bf16 never swaps: never swapping took 0.87-0.88x the time of
# always swapping there and 0.94-0.96x (SwiGLU, k=2) while this rule took 0.91-0.98x.
SWAP_ROWS = (16, 128)
SWAP_BLOCK = 16
SWAP_PAD = 2
# Router gate products, (T, D) x (D, E) and their gradients, run on oneDNN from this many tokens
# in fp32 (``gate_onednn``). D=512, 2 threads, forward / grad x / grad w in us, oneDNN against
# torch.mm: T=2048, E=8 111 / 94 / 144 against 181 / 169 / 219; T=2048, E=32 181 / 224 / 291
# against 365 / 346 / 502; T=8192, E=32 637 / 711 / 1185 against 1515 / 1446 / 2060; T=256,
# E=8 23 / 19 / 24 against 24 / 29 / 27; T=16 14 against 4 (torch.mm wins small products).
GATE_MIN_ROWS = 512
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


def use_onednn(backend: str, t: torch.Tensor, weight_numel: int) -> bool:
    """Whether ``backend`` ("auto" | "onednn" | "torch") runs the products of ``t`` with expert
    weights of ``weight_numel`` elements (D * F) on oneDNN: CPU tensors in a dtype oneDNN runs on
    this CPU (``onednn_available``); "auto" takes fp32 with weights of at least ``MIN_WEIGHT``
    elements on CPUs whose instruction set is in ``AUTO_ONEDNN_ISAS``, "onednn" fp32 and bf16 of
    any size. In bf16 torch.mm already calls oneDNN's
    matmul, and measured faster than this path (peers report). Where the CPU cannot run a
    requested path, torch.mm computes the same products."""
    if backend == "torch" or t.device.type != "cpu" or not onednn_available(t.dtype):
        return False
    if backend == "onednn":
        return True
    return (
        t.dtype == torch.float32
        and weight_numel >= MIN_WEIGHT
        and cpu_capability().isa in AUTO_ONEDNN_ISAS
    )


def gate_onednn(x_TD: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether a router's gate product on ``x`` computed in ``dtype`` runs on oneDNN: fp32 on
    CPU with at least ``GATE_MIN_ROWS`` tokens, on a torch with oneDNN."""
    return (
        dtype == torch.float32
        and x_TD.device.type == "cpu"
        and x_TD.shape[0] >= GATE_MIN_ROWS
        and onednn_available()
    )


def packable(backend: str, w: torch.Tensor, weight_numel: int) -> bool:
    """Whether forward-only products with weights like ``w`` may run on packed oneDNN copies
    (``Experts.pack_for_inference``): fp32 where ``backend`` runs them on oneDNN anyway, and bf16
    under the same size rule (unpacked, bf16 stays on torch.mm, which calls oneDNN's matmul
    itself; packed, oneDNN skips repacking the weights: 3-22% less bf16 forward time at
    D=512, F=2048 on the 2-core AMD machine, benchmarks/gemm.py packed)."""
    if w.dtype == torch.bfloat16 and backend == "auto":
        return use_onednn("onednn", w, weight_numel) and weight_numel >= MIN_WEIGHT
    return use_onednn(backend, w, weight_numel)


@dataclasses.dataclass(frozen=True)
class Packed:
    """A weight ``plain`` (K, N) with a copy ``onednn`` in oneDNN's blocked layout (opaque)."""

    plain: torch.Tensor
    onednn: torch.Tensor


def pack(w_KN: torch.Tensor, rows_hint: int) -> Packed:
    """``w`` repacked once for products of about ``rows_hint`` rows (other row counts use the
    same copy)."""
    packed = torch.ops.mkldnn._reorder_linear_weight(w_KN.detach().t().contiguous(), rows_hint)
    return Packed(w_KN, packed)


class PackCache:
    """Packed copies of stacked expert weights (E, K, N), one per expert, rebuilt when any weight
    changes (new storage, dtype or shape, or an in-place update such as an optimizer step). Copies
    and pickles start empty: the packed tensors are rebuilt on first use."""

    def __init__(self, rows_hint: int) -> None:
        self.rows_hint = rows_hint
        self._key: tuple | None = None
        self._packs: tuple[list[Packed] | None, ...] = ()

    def get(self, *weights: torch.Tensor | None) -> tuple[list[Packed] | None, ...]:
        key = tuple(
            None if w is None else (w.data_ptr(), _version(w), w.dtype, tuple(w.shape))
            for w in weights
        )
        if key != self._key:
            self._packs = tuple(
                None if w is None else [pack(w[e], self.rows_hint) for e in range(w.shape[0])]
                for w in weights
            )
            self._key = key
        return self._packs

    def __deepcopy__(self, memo: dict) -> PackCache:
        return PackCache(self.rows_hint)

    def __getstate__(self) -> dict:
        return {"rows_hint": self.rows_hint}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["rows_hint"])


def _version(w: torch.Tensor) -> int:
    # Inference tensors (made under torch.inference_mode) keep no version counter: an in-place
    # change to one inside inference mode is not seen; a new tensor (new storage) always is.
    return -1 if w.is_inference() else w._version


def _split(b: torch.Tensor | Packed) -> tuple[torch.Tensor, torch.Tensor]:
    """(the plain (K, N) weight, the weight operand oneDNN's linear takes: the packed copy, or
    the plain weight viewed as (N, K))."""
    return (b.plain, b.onednn) if isinstance(b, Packed) else (b, b.t())


def _onednn(a_MK: torch.Tensor, b_KN: torch.Tensor) -> bool:
    return a_MK.shape[0] >= MIN_ROWS and a_MK.dtype == b_KN.dtype


def _transposed(t: torch.Tensor) -> bool:
    """``t`` (2-D) is a view of a contiguous matrix's transpose and not contiguous itself."""
    return t.dim() == 2 and t.t().is_contiguous() and not t.is_contiguous()


def _swaps(a_MK: torch.Tensor, b_KN: torch.Tensor | Packed, onednn: bool) -> bool:
    """Whether a product allowed to swap does: fp32 on oneDNN (``onednn`` is only ever set for
    CPU tensors), b stored transposed, rows within ``SWAP_ROWS`` and at most ``SWAP_PAD`` short
    of a multiple of ``SWAP_BLOCK``."""
    M = a_MK.shape[0]
    lo, hi = SWAP_ROWS
    if not onednn or isinstance(b_KN, Packed) or not lo <= M <= hi or -M % SWAP_BLOCK > SWAP_PAD:
        return False
    return a_MK.dtype == torch.float32 and _transposed(b_KN) and _onednn(a_MK, b_KN)


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
    onednn: bool = False,
    out: torch.Tensor | None = None,
    swap: bool = False,
) -> torch.Tensor:
    """``act(a @ b + bias)`` (M, N), written into ``out`` when given. ``onednn`` runs it as one
    fused oneDNN op when the product has at least ``MIN_ROWS`` rows (on ``b``'s packed copy when
    it is ``Packed``). A transposed ``out`` (a weight gradient in the experts' layout) receives
    ``b^T a^T`` in its own row-major order. ``swap`` lets a product with rows within ``SWAP_ROWS``
    run as ``b^T a^T`` (module docstring); the result is then a transposed view."""
    if out is not None and _transposed(out) and bias_N is None and act == "none":
        # oneDNN reads a transposed left operand slowly, so b^T (N, K) is copied into row
        # order first (weight-gradient products, K = the expert's rows, 2 threads: 64 rows
        # 0.39 ms against 1.07 ms)
        a_NK = _split(b_KN)[0].t()
        a_NK = a_NK.contiguous() if onednn else a_NK
        matmul(a_NK, a_MK.t(), onednn=onednn, out=out.t())
        return out
    if swap and _swaps(a_MK, b_KN, onednn):
        y = _swapped(a_MK, b_KN, bias_N, act)
        return y if out is None else out.copy_(y)
    b_KN, w = _split(b_KN)
    if onednn and _onednn(a_MK, b_KN):
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
    onednn: bool = False,
    swap: bool = False,
) -> torch.Tensor:
    """``(a @ b + bias) * other``: SwiGLU's gate product, fused on oneDNN; ``swap`` as in
    ``matmul``."""
    if swap and _swaps(a_MK, b_KN, onednn):
        return _swapped(a_MK, b_KN, bias_N, "none", other_MN)
    plain, w = _split(b_KN)
    if onednn and _onednn(a_MK, plain):
        return torch.ops.mkldnn._linear_pointwise.binary(a_MK, other_MN, w, bias_N, "mul")
    return matmul(a_MK, b_KN, bias_N).mul_(other_MN)


def matmul_add(
    a_MK: torch.Tensor,
    b_KN: torch.Tensor,
    other_MN: torch.Tensor,
    *,
    onednn: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``a @ b + other``, written into ``out`` when given; fused on oneDNN."""
    if onednn and _onednn(a_MK, b_KN):
        y = torch.ops.mkldnn._linear_pointwise.binary(a_MK, other_MN, b_KN.t(), None, "add")
        return y if out is None else out.copy_(y)
    return torch.addmm(other_MN, a_MK, b_KN, out=out)
