import math

import torch

import moesaic as ms
from tests.unit.routing._util import route


def test_every_expert_gets_exactly_capacity_tokens_and_they_are_its_top_scores():
    T, E, K, cf = 50, 4, 2, 1.0
    router = ms.ROUTERS["expert_choice"](8, E, K, capacity_factor=cf)
    x = torch.randn(T, 8)
    r = route(router, x)
    C = math.ceil(cf * K * T / E)
    assert torch.bincount(r.expert, minlength=E).tolist() == [C] * E
    probs = router.logits(x).softmax(-1)
    for e in range(E):
        chosen = set(r.token[r.expert == e].tolist())
        assert chosen == set(probs[:, e].topk(C).indices.tolist())
        torch.testing.assert_close(r.weight[r.expert == e], probs[r.token[r.expert == e], e])
    assert r.aux_loss.item() == 0.0


def test_layer_capacity_factor_reaches_the_router_and_nothing_is_dropped():
    layer = ms.MoE(8, 16, 4, router="expert_choice", top_k=1, capacity_factor=2.0)
    assert layer.router.capacity_factor == 2.0
    layer(torch.randn(40, 8))
    assert layer.last_stats.tokens_per_expert.tolist() == [20] * 4
    assert layer.last_stats.dropped_fraction == 0.0


def test_capacity_is_capped_at_the_number_of_tokens():
    router = ms.ROUTERS["expert_choice"](8, 2, 2, capacity_factor=4.0)
    r = route(router, torch.randn(5, 8))
    assert torch.bincount(r.expert).tolist() == [5, 5]
