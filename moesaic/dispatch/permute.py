"""Permute tokens into the plan's expert order and combine expert outputs back, by gathers.

``permute`` is a gather (``index_select``) and so is the backward of ``combine``. With the
plan's ``slot`` (dropless top-k) ``combine`` and the backward of ``permute`` are K gathers too:
no scatter (``index_add``, which CPU runs as a far slower ``scatter_add``) on the hot path, and
nothing of size (A, D) saved beyond the experts' output.

Shape legend (docs/shapes.md): T tokens, D model dim, A assignments.
"""

from __future__ import annotations

import torch

from moesaic.dispatch.plan import DispatchPlan

__all__ = ["permute", "combine"]


def _sum_by_token(v_AD: torch.Tensor, plan: DispatchPlan, w_A: torch.Tensor | None) -> torch.Tensor:
    """``out[t] = sum of w[a] * v_AD[a]`` over t's kept assignments a (w = 1 when None): (T, D)."""
    T, D = plan.num_tokens, v_AD.shape[1]
    if plan.slot is None:
        src = v_AD if w_A is None else v_AD * w_A.unsqueeze(1)
        return v_AD.new_zeros(T, D).index_add_(0, plan.token, src)
    out = v_AD.index_select(0, plan.slot[:T])
    w_KT = None if w_A is None else w_A.index_select(0, plan.slot)
    if w_KT is not None:
        out.mul_(w_KT[:T].unsqueeze(1))
    for j in range(1, plan.top_k):
        rows = v_AD.index_select(0, plan.slot[j * T : (j + 1) * T])
        if w_KT is None:
            out.add_(rows)
        else:
            out.addcmul_(rows, w_KT[j * T : (j + 1) * T].unsqueeze(1))
    return out


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, plan):
        ctx.plan = plan
        return x_TD.index_select(0, plan.token)

    @staticmethod
    def backward(ctx, g_AD):
        return _sum_by_token(g_AD.contiguous(), ctx.plan, None), None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_AD, w_A, plan):
        ctx.plan = plan
        ctx.save_for_backward(y_AD, w_A)
        return _sum_by_token(y_AD, plan, w_A)

    @staticmethod
    def backward(ctx, gy_TD):
        y_AD, w_A = ctx.saved_tensors
        g_AD = gy_TD.contiguous().index_select(0, ctx.plan.token)
        gw_A = (g_AD * y_AD).sum(1).to(w_A.dtype) if ctx.needs_input_grad[1] else None
        gy_AD = g_AD.mul_(w_A.unsqueeze(1)) if ctx.needs_input_grad[0] else None
        return gy_AD, gw_A, None


def permute(x_TD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """Rows of x for each kept assignment, grouped by expert: (A, D). Backward gathers too when
    the plan has ``slot``."""
    return _Permute.apply(x_TD, plan)


def combine(y_AD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """``y_TD[t] = sum of weight[a] * y_AD[a]`` over t's kept assignments; dropped tokens get 0.

    Backward is a gather whatever the plan: ``grad y_AD[a] = weight[a] * grad y_TD[token[a]]``
    and ``grad weight[a] = <grad y_TD[token[a]], y_AD[a]>``.
    """
    return _Combine.apply(y_AD, plan.weight.to(y_AD.dtype), plan)
