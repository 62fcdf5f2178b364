"""Per-expert FFN on contiguous slices with a hand-written backward.

Why not plain autograd over ``w1[e]``: each indexed weight's backward either materialises a full
(E, D, F) zero tensor per expert (``select``) or stacks E gradients at the end (``unbind``); the
stack alone cost ~25% of a layer's backward on CPU at E=32. Here every matmul writes straight into
its slice of a preallocated output or weight gradient (on CPU through oneDNN, see
moesaic/experts/gemm.py), the forward runs without autograd bookkeeping, and backward keeps what
a dense FFN keeps: the pre-activation and the hidden state per expert (recomputing the
activation instead measured 1-2% slower at k=2 for one (A, F) tensor less).
Weight gradients reuse last step's memory when ``Experts.grad_pool`` says nobody holds it
(moesaic/experts/gradpool.py).

Shape legend (docs/shapes.md): A assignments grouped by expert, D model dim, F expert hidden.
"""

from __future__ import annotations

import torch

from moesaic.experts.gemm import ACT, PackCache, matmul, matmul_add, matmul_mul
from moesaic.experts.threads import run_experts

__all__ = ["records_autograd", "sliced_ffn"]


def records_autograd(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd records an op on these tensors (grad mode on and one requires grad)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _act_backward(name: str, grad: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    if name == "gelu":
        return torch.ops.aten.gelu_backward(grad, pre)
    if name == "gelu_tanh":
        return torch.ops.aten.gelu_backward(grad, pre, approximate="tanh")
    if name == "relu":
        return grad * (pre > 0)
    return torch.ops.aten.silu_backward(grad, pre)


def _starts(counts: list[int]) -> list[int]:
    """Row offset of each expert's slice."""
    out, start = [], 0
    for n in counts:
        out.append(start)
        start += n
    return out


def _forward(
    x_AD, w1, w2, w3, biases, counts, act, keep, threads=1, onednn=False, sink=None, rows=None
):
    """The expert FFNs; with ``keep`` also what backward needs, per expert: the pre-activation
    x w1 + b1, the hidden h that enters w2 and, for gated experts, x w3 + b3. ``biases`` is
    (b1, b2, b3) with None for absent ones. ``threads`` > 1 runs whole experts on that many
    worker threads (moesaic/experts/threads.py); ``onednn`` runs the products on oneDNN
    (moesaic/experts/gemm.py), which fuses the activation into the first one when nothing is
    kept. ``sink(rows, y)`` takes each expert's output instead of an (A, D) tensor (then None).
    With ``rows`` (A,), expert e's inputs are ``x_AD[rows[s_e]]``, gathered just before use.

    Per-expert temporaries (not one (A, F) buffer) keep every allocation small enough for the
    allocator to recycle between steps instead of mapping fresh pages each time.
    """
    b1, b2, b3 = biases
    A = x_AD.shape[0] if rows is None else rows.shape[0]
    y_AD = x_AD.new_empty(A, x_AD.shape[1]) if sink is None else None  # (A, D) like the input
    starts = _starts(counts)
    saved: dict[int, tuple] = {}

    def expert(e: int) -> None:
        s = slice(starts[e], starts[e] + counts[e])
        x = x_AD[s] if rows is None else x_AD.index_select(0, rows[s])
        # forward-only products may swap (gemm.SWAP_ROWS): h and y may be transposed views
        if keep:
            pre = matmul(x, w1[e], _at(b1, e), onednn=onednn)
            h = ACT[act](pre)
        else:
            pre, h = None, matmul(x, w1[e], _at(b1, e), act=act, onednn=onednn, swap=True)
        lin = None
        if w3 is not None:
            if keep:
                lin = matmul(x, w3[e], _at(b3, e), onednn=onednn)
                h = h * lin
            else:
                h = matmul_mul(x, w3[e], _at(b3, e), h, onednn=onednn, swap=True)
        if keep:
            saved[e] = (pre, h, lin)
        if sink is None:
            matmul(h, w2[e], _at(b2, e), onednn=onednn, out=y_AD[s], swap=not keep)
        else:  # the sink scatters rows: a transposed y is copied (a blocked transpose) first
            sink(s, matmul(h, w2[e], _at(b2, e), onednn=onednn, swap=True).contiguous())

    run_experts(expert, counts, threads)
    return y_AD, [saved[e] for e in sorted(saved)]


def _at(b: torch.Tensor | None, e: int) -> torch.Tensor | None:
    return None if b is None else b[e]


class _SlicedFFN(torch.autograd.Function):
    """y[s_e] = act(x[s_e] w1[e] + b1[e]) w2[e] + b2[e] for each expert's row slice s_e
    (gated: the hidden is multiplied by x[s_e] w3[e] + b3[e]); absent biases count as zero."""

    @staticmethod
    def forward(ctx, x_AD, w1, w2, w3, b1, b2, b3, counts, activation, pool, threads, onednn):
        act = "silu" if w3 is not None else activation
        y_AD, saved = _forward(x_AD, w1, w2, w3, (b1, b2, b3), counts, act, True, threads, onednn)
        flat = [t for triple in saved for t in triple if t is not None]
        ctx.save_for_backward(x_AD, w1, w2, w3, b1, b2, b3, *flat)
        ctx.counts, ctx.act, ctx.pool, ctx.threads = counts, act, pool, threads
        ctx.onednn = onednn
        return y_AD

    @staticmethod
    def backward(ctx, gy_AD):
        x_AD, w1, w2, w3, b1, b2, b3, *flat = ctx.saved_tensors
        per_expert = 2 if w3 is None else 3
        gy_AD = gy_AD.contiguous()
        need_x, need_w1, need_w2, need_w3, need_b1, need_b2, need_b3 = ctx.needs_input_grad[:7]
        gx = torch.empty_like(x_AD) if need_x else None
        gw1 = _grad_buffer(w1, ctx.counts, ctx.pool) if need_w1 else None
        gw2 = _grad_buffer(w2, ctx.counts, ctx.pool) if need_w2 else None
        gw3 = _grad_buffer(w3, ctx.counts, ctx.pool) if need_w3 else None
        # bias gradients: the column sums of the matching pre-activation gradients
        gb1 = _grad_buffer(b1, ctx.counts, None) if need_b1 else None
        gb2 = _grad_buffer(b2, ctx.counts, None) if need_b2 else None
        gb3 = _grad_buffer(b3, ctx.counts, None) if need_b3 else None
        starts = _starts(ctx.counts)
        index = {e: i for i, e in enumerate(e for e, n in enumerate(ctx.counts) if n)}
        onednn = ctx.onednn

        def mm(a, b, out=None):
            return matmul(a, b, onednn=onednn, out=out)

        def expert(e: int) -> None:
            s, i = slice(starts[e], starts[e] + ctx.counts[e]), index[e]
            x, gy = x_AD[s], gy_AD[s]
            pre, h = flat[per_expert * i], flat[per_expert * i + 1]
            gh = mm(gy, w2[e].t())
            if w3 is None:
                gpre, glin = _act_backward(ctx.act, gh, pre), None
            else:  # h = silu(pre) * lin
                lin = flat[per_expert * i + 2]
                gpre = _act_backward(ctx.act, gh * lin, pre)
                glin = gh * ACT[ctx.act](pre)
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

        run_experts(expert, ctx.counts, ctx.threads)
        return gx, gw1, gw2, gw3, gb1, gb2, gb3, None, None, None, None, None


def _grad_buffer(w: torch.Tensor, counts: list[int], pool) -> torch.Tensor:
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
    w1: torch.Tensor,
    w2: torch.Tensor,
    w3: torch.Tensor | None,
    counts: list[int],
    activation: str,
    pool=None,
    biases: tuple[torch.Tensor | None, ...] = (None, None, None),
    threads: int = 1,
    onednn: bool = False,
    packs: PackCache | None = None,
    sink=None,
    rows: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Run expert e on rows ``x_AD[sum(counts[:e]) : sum(counts[:e+1])]``; returns (A, D).

    ``biases`` is (b1 (E, F), b2 (E, D), b3 (E, F)), each None when absent. ``threads`` > 1
    runs whole experts on that many worker threads (moesaic/experts/threads.py); ``onednn`` runs
    the products on oneDNN (moesaic/experts/gemm.py).
    Without autograd (inference mode, no_grad, or nothing requiring grad) this is a plain loop
    that keeps nothing for backward, and with ``packs`` (``Experts.pack_for_inference``) the
    products run on oneDNN on the packed weights. ``sink`` (forward-only calls) takes
    each expert's output rows, ``sink(rows_slice, y)``, instead of an (A, D) output: then the
    return value is None (moesaic/experts/dispatch.py ``ScatterCombine``). ``rows`` (A,), for
    forward-only calls, makes ``x_AD`` any (N, D) tensor whose rows ``x_AD[rows]`` are the
    inputs: each expert gathers its own just before its products, while they fit in cache.
    """
    if records_autograd(x_AD, w1, w2, w3, *biases):
        for name, arg in (("sink", sink), ("rows", rows)):
            if arg is not None:
                raise ValueError(
                    f"sliced_ffn: {name}= is for forward-only calls (autograd is recording)"
                )
        return _SlicedFFN.apply(
            x_AD, w1, w2, w3, *biases, counts, activation, pool, threads, onednn
        )
    act = "silu" if w3 is not None else activation
    if packs is not None and x_AD.dtype == w1.dtype:
        w1, w2, w3 = packs.get(w1, w2, w3)
        onednn = True
    return _forward(x_AD, w1, w2, w3, biases, counts, act, False, threads, onednn, sink, rows)[0]
