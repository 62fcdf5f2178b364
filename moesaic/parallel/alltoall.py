"""``all_to_all_single`` with uneven splits as an autograd function.

Forward sends ``send_splits[r]`` rows to rank r and receives ``recv_splits[r]`` rows from it;
backward is the mirrored exchange of the gradients (DeepSpeed-MoE, FastMoE and Tutel all do this).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["all_to_all"]


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, recv_splits, send_splits, group):
        ctx.recv_splits, ctx.send_splits, ctx.group = recv_splits, send_splits, group
        return _exchange(x, recv_splits, send_splits, group)

    @staticmethod
    def backward(ctx, grad):
        return _exchange(grad, ctx.send_splits, ctx.recv_splits, ctx.group), None, None, None


def _exchange(x: torch.Tensor, recv_splits: list[int], send_splits: list[int], group):
    out = x.new_empty((sum(recv_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
    return out


def all_to_all(
    x: torch.Tensor, recv_splits: list[int], send_splits: list[int], group
) -> torch.Tensor:
    """Rows ``x[sum(send_splits[:r]) : sum(send_splits[:r+1])]`` go to rank r of ``group``; the
    result holds ``recv_splits[r]`` rows from each rank r, in rank order."""
    return _AllToAll.apply(x, recv_splits, send_splits, group)
