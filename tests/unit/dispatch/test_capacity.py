import pytest
import torch

import moesaic as ms
from moesaic.dispatch import make_plan
from moesaic.dispatch.capacity import DROP_POLICIES, PositionPolicy, PriorityPolicy
from moesaic.experts.reference import reference_keep
from moesaic.routing.base import Router, Routing


def _top1(weights, expert):
    T = len(weights)
    return Routing(
        token=torch.arange(T),
        expert=torch.tensor(expert),
        weight=torch.tensor(weights),
        choice=torch.zeros(T, dtype=torch.long),
        probs_TE=torch.zeros(T, 2),
        aux_loss=torch.zeros(()),
        z_loss=torch.zeros(()),
        priority=torch.tensor(weights),
    )


def _kept_pairs(plan):
    """(token, expert) of every kept assignment; the plan is grouped by expert."""
    expert = torch.repeat_interleave(torch.arange(len(plan.counts)), torch.tensor(plan.counts))
    return set(zip(plan.token.tolist(), expert.tolist()))


BPR_WEIGHTS = [0.90, 0.60, 0.80, 0.55, 0.95, 0.70, 0.65, 0.52]


@pytest.mark.parametrize("policy,kept", [("position", [0, 1]), ("priority", [4, 0])])
def test_bpr_example_from_the_vmoe_paper(policy, kept):
    # Riquelme et al. 2021 (V-MoE): 8 tokens, E=2, k=1, all on expert 0, ratio 0.5 -> B = 2.
    assert ms.expert_capacity(0.5, 1, 8, 2) == 2
    routing = _top1(BPR_WEIGHTS, [0] * 8)
    plan = make_plan(routing, 2, 8, 2, DROP_POLICIES[policy]())
    assert sorted(plan.token.tolist()) == sorted(kept)
    assert plan.counts == [2, 0]


def test_priority_dropping_keeps_exactly_the_highest_gate_tokens():
    torch.manual_seed(0)
    w = torch.rand(100)
    routing = _top1(w.tolist(), [0] * 100)
    plan = make_plan(routing, 2, 100, 17, PriorityPolicy())
    assert set(plan.token.tolist()) == set(w.topk(17).indices.tolist())


def test_a_first_choice_beats_a_higher_priority_second_choice():
    # Riquelme et al. 2021 (V-MoE): k=2, C=1; token A's 2nd choice and token B's 1st choice hit
    # expert 1; B's first choice wins though A has the higher priority.
    routing = Routing(
        token=torch.tensor([0, 1, 0, 1]),
        expert=torch.tensor([0, 1, 1, 2]),
        weight=torch.tensor([0.9, 0.4, 0.1, 0.3]),
        choice=torch.tensor([0, 0, 1, 1]),
        probs_TE=torch.zeros(2, 3),
        aux_loss=torch.zeros(()),
        z_loss=torch.zeros(()),
        priority=torch.tensor([0.9, 0.4, 0.9, 0.4]),
    )
    plan = make_plan(routing, 3, 2, 1, PriorityPolicy())
    assert _kept_pairs(plan) == {(0, 0), (1, 1), (1, 2)}  # (token, expert); A's 2nd choice dropped


@pytest.mark.parametrize("policy", ["position", "priority"])
@pytest.mark.parametrize("capacity", [1, 2, 3, 5, None])
def test_plan_agrees_with_the_reference_on_random_top2_routings(policy, capacity):
    torch.manual_seed(capacity or 0)
    T, E, K = 40, 5, 2
    probs = torch.randn(T, E).softmax(-1)
    w, e = probs.topk(K, dim=-1)
    routing = Routing.from_topk(w, e, probs, torch.zeros(()), torch.zeros(()))
    plan = make_plan(routing, E, T, capacity, DROP_POLICIES[policy]())
    keep = reference_keep(routing, E, capacity, policy)
    want = sorted((int(routing.token[a]), int(routing.expert[a])) for a in range(T * K) if keep[a])
    assert sorted(_kept_pairs(plan)) == want


def test_no_expert_holds_more_than_capacity_and_total_is_bounded():
    torch.manual_seed(0)
    probs = torch.randn(200, 8).softmax(-1)
    w, e = probs.topk(2, dim=-1)
    routing = Routing.from_topk(w, e, probs, torch.zeros(()), torch.zeros(()))
    C = ms.expert_capacity(0.6, 2, 200, 8)
    plan = make_plan(routing, 8, 200, C, PositionPolicy())
    assert max(plan.counts) <= C and sum(plan.counts) <= 8 * C


def test_layer_priority_policy_uses_the_router_weights():
    class Fixed(Router):
        def forward(self, x_TD, context):
            return _top1(BPR_WEIGHTS, [0] * 8)

    layer = ms.MoE(4, 8, 2, router=Fixed(4, 2), capacity_factor=0.5, drop_policy="priority")
    y = layer(torch.randn(8, 4))
    nonzero = (y.abs().sum(-1) > 0).nonzero().flatten().tolist()
    assert nonzero == [0, 4]


def test_expert_capacity_formula():
    assert ms.expert_capacity(1.25, 1, 1024, 8) == 160
    assert ms.expert_capacity(1.0, 2, 10, 3) == 7  # ceil(20/3)
    assert ms.expert_capacity(0.01, 1, 10, 8) == 1  # never zero
