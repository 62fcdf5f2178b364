"""Per-expert FFN on contiguous slices with a hand-written backward (CPU backend).

Why not plain autograd over ``w1[e]`` (the "torch" backend, moesaic/experts/loop.py): each
indexed weight's backward either materialises a full (E, D, F) zero tensor per expert
(``select``) or stacks E gradients at the end (``unbind``). Here every matmul writes straight
into its slice of a preallocated output or weight gradient (through oneDNN where the tuning
says so, moesaic/kernels/cpu/gemm.py), the forward runs without autograd bookkeeping, and
backward keeps what a dense FFN keeps: the pre-activation and the hidden state per expert.
Weight gradients reuse last step's memory when the gradient pool says nobody holds it
(moesaic/kernels/cpu/gradpool.py). docs/performance.md has the measurements.

Shape legend (docs/shapes.md): A assignments grouped by expert, D model dim, F expert hidden.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import torch

from moesaic.experts.backend import records_autograd
from moesaic.kernels.cpu.gemm import ACT, matmul, matmul_add, matmul_mul
from moesaic.kernels.cpu.gradpool import GradPool
from moesaic.kernels.cpu.packing import PackCache
from moesaic.kernels.cpu.threads import run_experts
from moesaic.kernels.cpu.tuning import CpuTuning

__all__ = ["Weights", "Run", "sliced_ffn"]

Sink = Callable[[slice, torch.Tensor], None]


class Weights(NamedTuple):
    """Stacked expert weights; w3 and the biases are None when absent."""

    w1: torch.Tensor
    w2: torch.Tensor
    w3: torch.Tensor | None = None
    b1: torch.Tensor | None = None
    b2: torch.Tensor | None = None
    b3: torch.Tensor | None = None


@dataclasses.dataclass(frozen=True)
class Run:
    """How one call runs: the activation, worker threads (1: the intra-op loop), whether the
    products run on oneDNN, the tuning (its thresholds and scheduling), the gradient pool and the
    experts' weights per projection (D * F; scheduling depends on it)."""

    act: str
    threads: int
    onednn: bool
    tuning: CpuTuning
    pool: GradPool | None = None
    weight_numel: int | None = None

    @property
    def products(self) -> CpuTuning | None:
        """What the gemm.py functions take as ``onednn``: the tuning, or None for torch.mm."""
        return self.tuning if self.onednn else None


def _starts(counts: list[int]) -> list[int]:
    """Row offset of each expert's slice."""
    out, start = [], 0
    for n in counts:
        out.append(start)
        start += n
    return out


def _at(b: torch.Tensor | None, e: int) -> torch.Tensor | None:
    return None if b is None else b[e]


def _forward(x_AD, w: Weights, counts, run: Run, keep: bool, sink=None, rows=None):
    """The expert FFNs; with ``keep`` also what backward needs, per expert: the pre-activation
    x w1 + b1, the hidden h that enters w2 and, for gated experts, x w3 + b3. Without ``keep``
    the activation is fused into the first product and products may swap (gemm.py).
    ``sink(rows, y)`` takes each expert's output instead of an (A, D) tensor (then None). With
    ``rows`` (A,), expert e's inputs are ``x_AD[rows[s_e]]``, gathered just before use.

    Per-expert temporaries (not one (A, F) buffer) keep every allocation small enough for the
    allocator to recycle between steps instead of mapping fresh pages each time.
    """
    A = x_AD.shape[0] if rows is None else rows.shape[0]
    y_AD = x_AD.new_empty(A, x_AD.shape[1]) if sink is None else None  # (A, D) like the input
    starts, saved, onednn = _starts(counts), {}, run.products

    def expert(e: int) -> None:
        s = slice(starts[e], starts[e] + counts[e])
        x = x_AD[s] if rows is None else x_AD.index_select(0, rows[s])
        if keep:
            pre = matmul(x, w.w1[e], _at(w.b1, e), onednn=onednn)
            h = ACT[run.act](pre)
        else:  # h and y may be transposed views (swapped products)
            pre, h = None, matmul(x, w.w1[e], _at(w.b1, e), act=run.act, onednn=onednn, swap=True)
        lin = None
        if w.w3 is not None:
            if keep:
                lin = matmul(x, w.w3[e], _at(w.b3, e), onednn=onednn)
                h = h * lin
            else:
                h = matmul_mul(x, w.w3[e], _at(w.b3, e), h, onednn=onednn, swap=True)
        if keep:
            saved[e] = (pre, h, lin)
        if sink is None:
            matmul(h, w.w2[e], _at(w.b2, e), onednn=onednn, out=y_AD[s], swap=not keep)
        else:  # the sink scatters rows: a transposed y is copied (a blocked transpose) first
            sink(s, matmul(h, w.w2[e], _at(w.b2, e), onednn=onednn, swap=True).contiguous())

    run_experts(expert, counts, run.threads, run.tuning, run.weight_numel)
    return y_AD, [saved[e] for e in sorted(saved)]


def _act_backward(name: str, grad: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    if name == "gelu":
        return torch.ops.aten.gelu_backward(grad, pre)
    if name == "gelu_tanh":
        return torch.ops.aten.gelu_backward(grad, pre, approximate="tanh")
    if name == "relu":
        return grad * (pre > 0)
    return torch.ops.aten.silu_backward(grad, pre)


class _SlicedFFN(torch.autograd.Function):
    """y[s_e] = act(x[s_e] w1[e] + b1[e]) w2[e] + b2[e] for each expert's row slice s_e
    (gated: the hidden is multiplied by x[s_e] w3[e] + b3[e]); absent biases count as zero."""

    @staticmethod
    def forward(ctx, x_AD, w1, w2, w3, b1, b2, b3, counts, run):
        y_AD, saved = _forward(x_AD, Weights(w1, w2, w3, b1, b2, b3), counts, run, True)
        flat = [t for triple in saved for t in triple if t is not None]
        ctx.save_for_backward(x_AD, w1, w2, w3, b1, b2, b3, *flat)
        ctx.counts, ctx.run = counts, run
        return y_AD

    @staticmethod
    def backward(ctx, gy_AD):
        x_AD, w1, w2, w3, b1, b2, b3, *flat = ctx.saved_tensors
        counts, run = ctx.counts, ctx.run
        per_expert = 2 if w3 is None else 3
        gy_AD = gy_AD.contiguous()
        need = ctx.needs_input_grad[:7]
        gx = torch.empty_like(x_AD) if need[0] else None
        gw1, gw2, gw3 = (
            _grad_buffer(p, counts, run.pool) if n else None
            for p, n in zip((w1, w2, w3), need[1:4])
        )
        # bias gradients: the column sums of the matching pre-activation gradients
        gb1, gb2, gb3 = (
            _grad_buffer(p, counts, None) if n else None for p, n in zip((b1, b2, b3), need[4:7])
        )
        starts = _starts(counts)
        index = {e: i for i, e in enumerate(e for e, n in enumerate(counts) if n)}
        onednn = run.products

        def mm(a, b, out=None):
            return matmul(a, b, onednn=onednn, out=out)

        def expert(e: int) -> None:
            s, i = slice(starts[e], starts[e] + counts[e]), index[e]
            x, gy = x_AD[s], gy_AD[s]
            pre, h = flat[per_expert * i], flat[per_expert * i + 1]
            gh = mm(gy, w2[e].t())
            if w3 is None:
                gpre, glin = _act_backward(run.act, gh, pre), None
            else:  # h = silu(pre) * lin
                lin = flat[per_expert * i + 2]
                gpre = _act_backward(run.act, gh * lin, pre)
                glin = gh * ACT[run.act](pre)
                if gw3 is not None:
                    mm(x.t(), glin, out=gw3[e])
                if gb3 is not None:
                    torch.sum(glin, dim=0, out=gb3[e])
            if gw2 is not None:
                mm(h.t(), gy, out=gw2[e])
            if gb2 is not None:
                torch.sum(gy, dim=0, out=gb2[e])
            if gw1 is not None:
                mm(x.t(), gpre, out=gw1[e])
            if gb1 is not None:
                torch.sum(gpre, dim=0, out=gb1[e])
            if gx is not None:
                if glin is None:
                    mm(gpre, w1[e].t(), out=gx[s])
                else:
                    matmul_add(glin, w3[e].t(), mm(gpre, w1[e].t()), onednn=onednn, out=gx[s])

        run_experts(expert, counts, run.threads, run.tuning, run.weight_numel)
        return gx, gw1, gw2, gw3, gb1, gb2, gb3, None, None


def _grad_buffer(w: torch.Tensor, counts: list[int], pool: GradPool | None) -> torch.Tensor:
    """Uninitialised gradient of w, zeroed only on the experts that received no rows."""
    g = pool.take(w) if pool is not None else None
    if g is None:
        g = torch.empty_like(w)
    for e, n in enumerate(counts):
        if n == 0:
            g[e].zero_()
    return g


def sliced_ffn(
    x_AD: torch.Tensor,
    w: Weights,
    counts: list[int],
    run: Run,
    *,
    packs: PackCache | None = None,
    sink: Sink | None = None,
    rows: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Run expert e on rows ``x_AD[sum(counts[:e]) : sum(counts[:e+1])]``; returns (A, D).

    Without autograd (inference mode, no_grad, or nothing requiring grad) this is a plain loop
    that keeps nothing for backward, and with ``packs`` the products run on oneDNN on the packed
    weights. ``sink`` (forward-only calls) takes each expert's output rows,
    ``sink(rows_slice, y)``, instead of an (A, D) output: then the return value is None
    (moesaic/kernels/cpu/combine.py). ``rows`` (A,), for forward-only calls, makes ``x_AD`` any
    (N, D) tensor whose rows ``x_AD[rows]`` are the inputs: each expert gathers its own just
    before its products, while they fit in cache.
    """
    if w.w3 is not None:
        run = dataclasses.replace(run, act="silu")
    if records_autograd(x_AD, *w):
        if sink is not None or rows is not None:
            raise ValueError("sliced_ffn: sink= and rows= are for forward-only calls")
        return _SlicedFFN.apply(x_AD, *w, counts, run)
    if packs is not None and x_AD.dtype == w.w1.dtype:
        w1, w2, w3 = packs.get(w.w1, w.w2, w.w3)
        w = w._replace(w1=w1, w2=w2, w3=w3)
        run = dataclasses.replace(run, onednn=True)
    return _forward(x_AD, w, counts, run, False, sink, rows)[0]
