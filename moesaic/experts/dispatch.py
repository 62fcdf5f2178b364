"""Sort-based dispatch: permute assignments into contiguous per-expert slices, then combine.

No one-hot (T, E, C) tensor anywhere: capacity and dispatch are one stable sort of the A
assignments by (expert, processing order), a per-expert position from the counts, and index-only
data movement. ``permute`` is a gather (``index_select``) and so is the backward of ``combine``.
When every token kept its K choices in the ``from_topk`` layout (dropless top-k routers), the
plan also holds ``slot``, the inverse permutation, and ``combine`` and the backward of
``permute`` are K gathers too: no scatter (``index_add``, which CPU runs as a far slower
``scatter_add``) on the hot path, and nothing of size (A, D) saved beyond the experts' output.

Forward-only calls on such plans skip the (A, D) output altogether: ``ScatterCombine`` takes
each expert's output rows while they are still in cache, scales them by their combine weights
and writes them to their token's row (unique destinations, so a plain ``index_put_``), and adds
the K choices at the end.

Shape legend (docs/shapes.md): T tokens, D model dim, E experts, A assignments.
"""

from __future__ import annotations

import dataclasses

import torch

from moesaic.routing.base import Routing
from moesaic.routing.capacity import DropPolicy

__all__ = ["DispatchPlan", "ScatterCombine", "make_plan", "permute", "combine", "scatter_combine"]


@dataclasses.dataclass(frozen=True)
class DispatchPlan:
    """Kept assignments sorted by expert.

    Attributes:
        token: LongTensor (A,), source token of each kept assignment, grouped by expert.
        weight: (A,) combine weight of each kept assignment.
        counts: kept assignments per expert as Python ints (the single host read of the path).
        tokens_per_expert: LongTensor (E,), the same counts on the device.
        requested_per_expert: LongTensor (E,), assignments per expert before capacity.
        num_tokens: T.
        slot: LongTensor (K*T,), row of the expert-sorted order that holds choice j of token t
            at index ``j * T + t``; only when every token kept all K choices of a ``dense_k``
            routing, else None.
        top_k: K of ``slot`` (0 when ``slot`` is None).
        source: LongTensor (A,), the inverse of ``slot``: index ``j * T + t`` of each sorted
            assignment; set with ``slot``.
    """

    token: torch.Tensor
    weight: torch.Tensor
    counts: list[int]
    tokens_per_expert: torch.Tensor
    requested_per_expert: torch.Tensor
    num_tokens: int
    slot: torch.Tensor | None = None
    top_k: int = 0
    source: torch.Tensor | None = None


def make_plan(
    routing: Routing,
    num_experts: int,
    num_tokens: int,
    capacity: int | None,
    policy: DropPolicy,
) -> DispatchPlan:
    """Apply capacity (None = dropless) and sort the kept assignments by expert."""
    expert_A = routing.expert
    requested_E = torch.bincount(expert_A, minlength=num_experts)
    slot, top_k, source = None, 0, None
    if capacity is None:
        sorted_A = torch.argsort(expert_A, stable=True)
        kept_E = requested_E
        if routing.dense_k is not None:
            top_k, source = routing.dense_k, sorted_A
            slot = torch.empty_like(sorted_A)
            slot[sorted_A] = torch.arange(sorted_A.shape[0], device=sorted_A.device)
    else:
        # Sort by expert, ties in the policy's processing order; an assignment's position in its
        # expert's queue is then its index minus the expert's start offset.
        order_A = policy.order(routing)
        sorted_A = order_A[torch.argsort(expert_A[order_A], stable=True)]
        start_E = torch.cumsum(requested_E, dim=0) - requested_E
        position_A = (
            torch.arange(sorted_A.shape[0], device=sorted_A.device) - start_E[expert_A[sorted_A]]
        )
        sorted_A = sorted_A[position_A < capacity]
        kept_E = requested_E.clamp(max=capacity)
    return DispatchPlan(
        token=routing.token[sorted_A],
        weight=routing.weight[sorted_A],
        counts=kept_E.tolist(),
        tokens_per_expert=kept_E,
        requested_per_expert=requested_E,
        num_tokens=num_tokens,
        slot=slot,
        top_k=top_k,
        source=source,
    )


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


class ScatterCombine:
    """``combine`` fused into the expert loop of a forward-only call on a plan with ``slot``.

    Call it with each expert's rows ``rows`` (a slice of the sorted order) and their output
    ``y`` (R, D), which it scales in place by the combine weights and writes to row
    ``j * T + t`` of a (K*T, D) buffer: every destination is written exactly once, so calls
    may come from any thread in any order. ``result()`` adds the K choices in choice order, as
    ``combine`` does (equal up to the rounding of its fused multiply-add). Unfused, each
    expert's output is copied into an (A, D) tensor and gathered back from it, two passes over
    memory that is no longer in cache.
    """

    def __init__(self, plan: DispatchPlan, like: torch.Tensor) -> None:
        if plan.source is None:
            raise ValueError("ScatterCombine needs a plan with slot (dropless top-k routing)")
        T, K = plan.num_tokens, plan.top_k
        self.num_tokens, self.top_k = T, K
        self.source = plan.source
        self.weight = plan.weight.to(like.dtype)
        self.out = like.new_empty(K * T, like.shape[1])

    def __call__(self, rows: slice, y: torch.Tensor) -> None:
        y.mul_(self.weight[rows].unsqueeze(1))
        self.out.index_put_((self.source[rows],), y)

    def result(self) -> torch.Tensor:
        """The combined (T, D) output."""
        T, out = self.num_tokens, self.out
        if self.top_k == 1:
            return out
        y = out[:T] + out[T : 2 * T]
        for j in range(2, self.top_k):
            y.add_(out[j * T : (j + 1) * T])
        return y


def scatter_combine(plan: DispatchPlan, like: torch.Tensor) -> ScatterCombine | None:
    """A ``ScatterCombine`` for the plan, or None when it has no ``slot``."""
    return None if plan.source is None else ScatterCombine(plan, like)
