"""BASE layers: balanced optimal assignment in training, greedy top-1 at evaluation."""

import sys

import pytest
import torch

import moesaic as ms
from tests.unit.routing._util import (
    best_balanced_total_brute_force,
    best_balanced_total_scipy,
    identity_gate,
    route,
    total_score,
)


def _router(E: int, **options):
    router = ms.ROUTERS["base"](E, E, **options)  # d_model == E: the identity gate sets logits
    identity_gate(router)
    return router


@pytest.mark.parametrize("solver", ["auto", "auction", "scipy"])
@pytest.mark.parametrize("T,E", [(64, 8), (60, 4), (33, 4), (50, 7), (5, 8)])
def test_training_gives_every_expert_floor_or_ceil_of_t_over_e_tokens(T, E, solver):
    router = _router(E, solver=solver).train()
    r = route(router, torch.randn(T, E))
    base, extra = divmod(T, E)
    counts = torch.bincount(r.expert, minlength=E).tolist()
    assert sorted(counts) == [base] * (E - extra) + [base + 1] * extra
    assert r.token.tolist() == list(range(T))  # one assignment per token


@pytest.mark.parametrize("T,E", [(6, 2), (6, 3), (7, 3), (8, 4)])
def test_training_assignment_is_optimal_against_brute_force(T, E):
    router = _router(E).train()
    x = torch.randn(T, E)
    r = route(router, x)
    assert total_score(x, r.expert) == pytest.approx(best_balanced_total_brute_force(x), abs=1e-6)


@pytest.mark.parametrize("T,E", [(128, 8), (45, 6)])
def test_training_assignment_is_optimal_against_scipy(T, E):
    router = _router(E).train()
    x = torch.randn(T, E)
    r = route(router, x)
    assert total_score(x, r.expert) == pytest.approx(best_balanced_total_scipy(x), abs=1e-5)


def test_evaluation_takes_each_tokens_best_expert():
    router = _router(4).eval()
    x = torch.randn(30, 4)
    x[:, 1] += 3.0  # most tokens prefer expert 1: greedy routing does not balance them
    r = route(router, x)
    assert r.expert.tolist() == [int(x[t].argmax()) for t in range(30)]
    assert torch.bincount(r.expert, minlength=4)[1] > 30 // 4 + 1


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_the_weight_is_the_sigmoid_of_the_chosen_logit_and_trains_the_gate(training):
    layer = ms.MoE(8, 16, 4, router="base").train(training)
    x = torch.randn(12, 8)
    seen = []
    layer.router.register_forward_hook(lambda m, a, out: seen.append(out))
    layer(x).pow(2).sum().backward()
    r = seen[-1]
    logits = x @ layer.router.gate.weight.t()
    want = torch.stack([logits[t, e].sigmoid() for t, e in zip(r.token, r.expert)])
    torch.testing.assert_close(r.weight.detach(), want)
    assert r.aux_loss.item() == 0.0
    assert layer.router.gate.weight.grad.abs().sum() > 0


def test_a_full_capacity_layer_drops_nothing_in_training():
    # cf = 1 gives C = T/E slots, exactly what the balanced assignment fills
    layer = ms.MoE(8, 16, 4, router="base", capacity_factor=1.0).train()
    with torch.no_grad():
        layer.router.gate.weight[0] += 1.0  # a gate skewed towards expert 0
    layer(torch.rand(32, 8))
    assert layer.last_stats.dropped_fraction == 0.0
    assert layer.last_stats.tokens_per_expert.tolist() == [8, 8, 8, 8]


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"top_k": 2}, ValueError, r"top_k=2 must be 1 for router='base'"),
        ({"solver": "greedy"}, ValueError, r"solver='greedy' is not one of"),
        ({"n_groups": 2}, ValueError, r"n_groups: not available for router='base'"),
    ],
)
def test_bad_options_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        ms.ROUTERS["base"](8, 4, **kwargs)


def test_the_scipy_solver_without_scipy_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy.optimize", None)
    with pytest.raises(ImportError, match=r"pip install 'moesaic\[routers\]'"):
        ms.MoE(8, 16, 4, router="base", router_options={"solver": "scipy"})
