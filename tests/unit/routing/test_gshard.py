import math

import pytest
import torch

import moesaic as ms
from moesaic.dispatch import make_plan
from moesaic.dispatch.capacity import PositionPolicy
from moesaic.routing.losses import balance_loss
from tests.unit.routing._util import identity_gate, route


def test_gshard_aux_loss_hand_worked():
    # probs rows [.5,.3,.2] and [.2,.5,.3]: first choices 0 and 1 -> f = [.5,.5,0]
    # P = [.35,.4,.25]; aux = E * sum f P = 3 * (.5*.35 + .5*.4) = 1.125
    router = ms.ROUTERS["gshard"](3, 3).eval()
    identity_gate(router)
    x = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.5, 0.3]]).log()
    r = route(router, x)
    assert r.aux_loss.item() == pytest.approx(1.125, abs=1e-6)
    # weights renormalised over the top two: .5/.8, .3/.8
    torch.testing.assert_close(r.weight, torch.tensor([0.625, 0.625, 0.375, 0.375]))
    assert r.expert.tolist() == [0, 1, 1, 2] and r.choice.tolist() == [0, 0, 1, 1]


def test_lingvo_scaled_gshard_loss_equals_the_switch_form():
    # Lepikhin et al. 2021 (GShard): E^2 * mean_e(f_e * m_e) == E * sum_e f_e P_e
    probs = torch.randn(64, 8).softmax(-1)
    first = probs.argmax(-1)
    f = torch.bincount(first, minlength=8).float() / 64
    lingvo = 8**2 * (f * probs.mean(0)).mean()
    torch.testing.assert_close(balance_loss(probs, first), lingvo)


def test_random_second_expert_keep_rate_matches_its_expectation():
    # Lepikhin et al. 2021 (GShard): second expert kept with probability min(1, 2 g2), over 10k
    # tokens.
    router = ms.ROUTERS["gshard"](16, 8)
    x = torch.randn(10_000, 16) * 3
    g2 = route(router.eval(), x).weight[10_000:]
    expected = torch.clamp(2 * g2, max=1).mean().item()
    kept = (route(router.train(), x).choice == 1).float().sum().item() / 10_000
    assert abs(kept - expected) < 0.02
    assert 0.2 < expected < 0.98  # a rate that actually tests something


def test_first_choices_are_placed_before_any_second_choice():
    # Lepikhin et al. 2021 (GShard), with C=1. First choices: token 0 -> e0, token 1 -> e0,
    # token 2 -> e1.
    # Second choices: token 0 -> e1, token 1 -> e2, token 2 -> e0. The second pass must never
    # evict a first-pass assignment, even one made by a later token.
    routing = ms.Routing(
        token=torch.tensor([0, 1, 2, 0, 1, 2]),
        expert=torch.tensor([0, 0, 1, 1, 2, 0]),
        weight=torch.tensor([0.6, 0.6, 0.7, 0.4, 0.4, 0.3]),
        choice=torch.tensor([0, 0, 0, 1, 1, 1]),
        probs_TE=torch.zeros(3, 3),
        aux_loss=torch.zeros(()),
        z_loss=torch.zeros(()),
    )
    plan = make_plan(routing, 3, 3, capacity=1, policy=PositionPolicy())
    # expert 0 keeps token 0 (first choice); expert 1 keeps token 2's *first* choice, not token 0's
    # second; expert 2 keeps token 1's second choice.
    assert plan.token.tolist() == [0, 2, 1]
    assert plan.counts == [1, 1, 1]


def test_gshard_is_top2_only():
    with pytest.raises(ValueError, match="must be 2"):
        ms.MoE(8, 16, 4, router="gshard", top_k=1)
    assert ms.MoE(8, 16, 4, router="gshard").top_k == 2
    assert math.isfinite(ms.MoE(8, 16, 4, router="gshard")(torch.randn(3, 8)).sum().item())
