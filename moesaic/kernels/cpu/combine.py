"""``combine`` fused into the CPU expert loop of forward-only calls.

Forward-only calls on a plan with ``slot`` (dropless top-k) skip the (A, D) expert output
altogether: ``ScatterCombine`` takes each expert's output rows while they are still in cache,
scales them by their combine weights and writes them to their token's row (unique destinations,
so a plain ``index_put_``), and adds the K choices at the end.

Shape legend (docs/shapes.md): T tokens, D model dim, K top-k, A assignments.
"""

from __future__ import annotations

import torch

from moesaic.dispatch.plan import DispatchPlan

__all__ = ["ScatterCombine", "scatter_combine"]


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
