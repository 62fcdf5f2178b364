"""Expert-parallel execution of one MoE layer's experts.

Each of the W ranks of the expert group owns L = E / W consecutive experts (rank r: experts
r*L .. r*L+L-1). The tokens of a rank arrive here already sorted by global expert, so they are
also grouped by destination rank. The exchange::

    counts (W, L)  --all_to_all-->  recv (W, L): rows each source rank sends each local expert
    x rows         --all_to_all-->  rows in (source, local expert) order
    regroup to (local expert, source) order -> local experts -> back to (source, expert) order
    y rows         --all_to_all-->  the original order, on the rank that owns the tokens

The router and the combine weights never leave their rank; capacity was applied per rank to its
local tokens before dispatch (GShard's local group dispatching).

Shape legend (docs/shapes.md): A assignments, D model dim, E experts, L local experts,
W expert-group ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moesaic.experts import Experts
from moesaic.parallel.alltoall import all_to_all

__all__ = ["run_experts_parallel"]


def run_experts_parallel(
    experts: Experts, group, x_AD: torch.Tensor, counts_E: list[int]
) -> torch.Tensor:
    """Outputs of ``x_AD``'s rows (grouped by global expert, ``counts_E[e]`` rows for expert e)
    computed by the ranks that own those experts; same order and shape as ``x_AD``."""
    W, L = dist.get_world_size(group), experts.num_experts
    send_WL = torch.tensor(counts_E, dtype=torch.long).view(W, L)
    recv_WL = torch.empty_like(send_WL)
    dist.all_to_all_single(recv_WL, send_WL, group=group)  # one (L,) row per peer
    send_splits, recv_splits = send_WL.sum(1).tolist(), recv_WL.sum(1).tolist()
    x_recv = all_to_all(x_AD, recv_splits, send_splits, group)
    order = _expert_major_order(recv_WL).to(x_AD.device)
    y_local = experts(x_recv.index_select(0, order), recv_WL.sum(0).tolist())
    y_recv = y_local.index_select(0, torch.argsort(order))
    return all_to_all(y_recv, send_splits, recv_splits, group)


def _expert_major_order(recv_WL: torch.Tensor) -> torch.Tensor:
    """Row permutation from (source rank, local expert) order to (local expert, source) order."""
    flat = recv_WL.reshape(-1)
    start_WL = (torch.cumsum(flat, 0) - flat).view_as(recv_WL)
    starts, lengths = start_WL.t().reshape(-1), recv_WL.t().reshape(-1)
    out_start = torch.cumsum(lengths, 0) - lengths
    total = int(lengths.sum())
    return torch.repeat_interleave(starts - out_start, lengths, output_size=total) + torch.arange(
        total
    )
