"""The communication model's all-to-all byte counts (``ms.parallel.comm_model``) equal what
the expert-parallel layer hands to ``all_to_all_single`` on 2 and 4 gloo processes, forward and
backward, dropless and with a capacity factor."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from benchmarks.harness import AllToAllMeter
from moesaic.parallel.comm_model import MoEStep, alltoall_bytes, step_time
from tests.distributed._launch import run_distributed

T, D, F, E = 96, 16, 32, 8
CASES = [(2, None), (1, None), (2, 1.0), (1, 4.0)]  # (top_k, capacity_factor)


def _measure(rank, world):
    import moesaic as ms

    groups = ms.parallel.init(expert=world)
    out = []
    for k, cf in CASES:
        torch.manual_seed(0)
        layer = ms.MoE(D, F, E, router="topk", top_k=k, capacity_factor=cf,
                       expert_group=groups.expert_group)  # fmt: skip
        # an activation inside a model: its gradient is exchanged back in backward too
        x = torch.randn(T, D, generator=torch.Generator().manual_seed(rank)).requires_grad_()
        with AllToAllMeter() as meter:
            y = layer(x)
            forward = meter.bytes
            y.square().sum().backward()
        # assignments this rank kept (the rows it sends out): all of them when nothing drops
        kept = int(layer.last_stats.tokens_per_expert.sum())
        out.append((forward, meter.bytes - forward, kept))
    mean = torch.tensor(out, dtype=torch.float64)
    dist.all_reduce(mean)
    return (mean / world).tolist()


@pytest.mark.parametrize("world", [2, 4])
def test_the_modelled_bytes_equal_the_measured_ones(world):
    measured = run_distributed(_measure, world)[0]
    for (k, cf), (forward, backward, kept) in zip(CASES, measured):
        step = MoEStep(tokens=T, d_model=D, d_ff=F, n_layers=1, moe_layers=1, num_experts=E,
                       top_k=k, capacity_factor=cf, dtype_bytes=4)  # fmt: skip
        model = alltoall_bytes(step, world)
        if cf is None or kept == k * T:  # nothing dropped: the model is exact
            assert (forward, backward) == (model["forward"], model["backward"]), (k, cf)
        else:  # drops send fewer rows than the slots the model charges
            assert forward < model["forward"] and backward < model["backward"], (k, cf)


def test_the_step_time_charges_only_rows_that_leave_the_rank_and_the_node():
    step = MoEStep(tokens=4096, d_model=4096, d_ff=14336, n_layers=32, moe_layers=32,
                   num_experts=64, top_k=2)  # fmt: skip
    one = step_time(step, 1)
    assert one["alltoall"] == 0 and one["total"] == one["compute"]
    eight, sixty_four = step_time(step, 8), step_time(step, 64)
    assert eight["off_node_fraction"] == 0 and sixty_four["off_node_fraction"] == 56 / 64
    # by hand: 64 ranks, 2 * k * T * D * 2 bytes per direction, forward + backward, 32 layers
    rows = 2 * 2 * 4096 * 4096 * 2
    per_layer = 2 * rows + 64 * 8
    assert sixty_four["bytes_per_layer"] == per_layer
    hand = 32 * (per_layer * 7 / 64 / 450e9 + per_layer * 56 / 64 / 50e9 + 5 * 10e-6)
    assert sixty_four["alltoall"] == pytest.approx(hand, rel=1e-12)
    with pytest.raises(ValueError, match="world=3 must divide num_experts=64"):
        alltoall_bytes(step, 3)
