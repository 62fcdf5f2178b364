"""Expert parallelism on 2 and 4 gloo processes equals one process holding every expert."""

from __future__ import annotations

import pytest
import torch

import moesaic as ms
from tests.distributed._launch import run_distributed

E, D, F = 8, 6, 10
CASES = [
    ("topk", 2, None, "position", {}),
    ("topk", 1, 1.0, "priority", {}),
    ("noisy_topk", 2, None, "position", {}),
    ("switch", 1, 0.5, "position", {}),
    ("gshard", 2, 1.0, "priority", {}),
    ("prototype", 2, None, "position", {}),
    ("expert_choice", 1, 1.0, "position", {}),
    ("hash", 2, None, "position", {}),
    ("task", 2, None, "position", {"num_tasks": 3}),
    ("skill", None, None, "position", {"task_skills": [[0], [1, 5], [7, 2, 3]]}),
    ("cluster", 1, None, "position", {}),
]


def _layer(case, group=None):
    router, k, cf, policy, options = case
    torch.manual_seed(0)
    return ms.MoE(
        D,
        F,
        E,
        router=router,
        top_k=k,
        capacity_factor=cf,
        drop_policy=policy,
        router_options=options or None,
        activation="swiglu",
        expert_group=group,
    )


def _forward(layer, x, rank, seed):
    torch.manual_seed(seed)  # the same router noise for the sharded and the reference run
    with ms.routing_context(task=rank % 3):
        y = layer(x)
    return y, layer.aux_loss


def _body(rank, world, routers):
    groups = ms.parallel.init(expert=world)
    assert groups.expert_size == world and groups.replica_group is None
    for case in CASES:
        if routers is not None and case[0] not in routers:
            continue
        layer, ref = _layer(case, groups.expert_group), _layer(case)
        local = E // world
        assert layer.experts.w1.shape == (local, D, F)
        inputs = [
            torch.randn(3, 7, D, generator=torch.Generator().manual_seed(100 + r))
            for r in range(world)
        ]
        grads_out = [
            torch.randn(3, 7, D, generator=torch.Generator().manual_seed(200 + r))
            for r in range(world)
        ]
        x = inputs[rank].clone().requires_grad_()
        y, aux = _forward(layer, x, rank, seed=rank)
        ((y * grads_out[rank]).sum() + aux).backward()
        # Reference: every rank's tokens through the full layer, one rank at a time.
        expert_grads = {n: torch.zeros_like(p) for n, p in ref.experts.named_parameters()}
        for r in range(world):
            ref.zero_grad(set_to_none=True)
            x_r = inputs[r].clone().requires_grad_()
            y_r, aux_r = _forward(ref, x_r, r, seed=r)
            ((y_r * grads_out[r]).sum() + aux_r).backward()
            for n, p in ref.experts.named_parameters():
                expert_grads[n] += p.grad
            if r == rank:
                torch.testing.assert_close(y, y_r, atol=1e-5, rtol=1e-5, msg=str(case))
                torch.testing.assert_close(aux, aux_r, atol=1e-6, rtol=1e-6, msg=str(case))
                torch.testing.assert_close(
                    x.grad, x_r.grad, atol=1e-5, rtol=1e-5, msg=f"{case} input gradient"
                )
                for (n, p), (_, q) in zip(
                    layer.router.named_parameters(), ref.router.named_parameters()
                ):
                    torch.testing.assert_close(
                        p.grad, q.grad, atol=1e-5, rtol=1e-5, msg=f"{case} router {n}"
                    )
        for n, p in layer.experts.named_parameters():
            want = expert_grads[n][rank * local : (rank + 1) * local]
            torch.testing.assert_close(p.grad, want, atol=1e-5, rtol=1e-5, msg=f"{case} {n}")


def _zero_token_body(rank, world):
    groups = ms.parallel.init(expert=world)
    layer = ms.MoE(D, F, E, router="switch", jitter=0.0, expert_group=groups.expert_group)
    with torch.no_grad():  # every token picks expert 0: all other experts get nothing
        layer.router.gate.weight.zero_()
        layer.router.gate.weight[0] = 1.0
    x = torch.rand(5, D) + 0.1
    layer(x).sum().backward()
    assert layer.last_stats.tokens_per_expert.tolist() == [5] + [0] * (E - 1)
    if rank != 0:
        assert not layer.experts.w1.grad.any()
    else:
        assert layer.experts.w1.grad[0].abs().sum() > 0 and not layer.experts.w1.grad[1:].any()


@pytest.mark.parametrize("world", [2, 4])
def test_every_router_matches_the_single_process_layer(world):
    routers = None if world == 2 else {"topk", "gshard", "expert_choice", "skill"}
    run_distributed(_body, world, routers)


def test_experts_that_receive_no_tokens_work():
    run_distributed(_zero_token_body, 2)


def test_experts_must_divide_over_the_group():
    run_distributed(_indivisible_body, 2)


def _indivisible_body(rank, world):
    groups = ms.parallel.init(expert=world)
    with pytest.raises(ValueError, match="num_experts=3 must be divisible"):
        ms.MoE(D, F, 3, expert_group=groups.expert_group)


def test_benchmark_reports_bytes_at_the_floor(capsys):
    from benchmarks.expert_parallel import main

    args = "--tokens 64 --d-model 16 --d-ff 32 --experts 4 --worlds 2 --repeats 1"
    assert main(args.split()) == 0
    out = capsys.readouterr().out
    assert "| 2 |" in out and "| 1.0000 |" in out
