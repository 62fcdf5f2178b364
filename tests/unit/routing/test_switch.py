import math

import pytest
import torch

import moesaic as ms
from tests.unit.routing._util import identity_gate, route


def test_switch_aux_loss_hand_worked():
    # logits [ln3, 0] -> probs [.75, .25]; three such tokens and one mirrored.
    # f = [3/4, 1/4]; P = [(3*.75 + .25)/4, (3*.25 + .75)/4] = [.625, .375]
    # aux = E * sum f P = 2 * (.75*.625 + .25*.375) = 1.125; the layer multiplies by alpha.
    router = ms.ROUTERS["switch"](2, 2, jitter=0.0).eval()
    identity_gate(router)
    l3 = math.log(3.0)
    x = torch.tensor([[l3, 0.0], [l3, 0.0], [l3, 0.0], [0.0, l3]])
    r = route(router, x)
    assert r.aux_loss.item() == pytest.approx(1.125, abs=1e-6)
    assert r.expert.tolist() == [0, 0, 0, 1]
    torch.testing.assert_close(r.weight, torch.tensor([0.75, 0.75, 0.75, 0.75]))


def test_switch_aux_loss_is_one_at_uniform_routing_so_the_layer_reports_alpha():
    # Fedus et al. 2022 (Switch): minimised by uniform routing, where alpha * E * sum f P == alpha.
    layer = ms.MoE(4, 8, 4, router="switch", aux_loss_weight=0.01, jitter=0.0)
    identity_gate(layer.router)
    x = torch.eye(4).repeat(25, 1) * 1e-6  # near-uniform probs, one first choice per expert
    layer(x)
    assert layer.aux_loss.item() == pytest.approx(0.01, abs=1e-6)


def test_switch_keeps_the_raw_probability_and_is_top1():
    router = ms.ROUTERS["switch"](6, 6).eval()
    x = torch.randn(30, 6)
    r = route(router, x)
    probs = router.logits(x).softmax(-1)
    torch.testing.assert_close(r.weight, probs.max(-1).values)
    assert r.num_assignments == 30 and (r.choice == 0).all()


def test_switch_jitter_only_in_training_and_within_bounds():
    router = ms.ROUTERS["switch"](8, 4, jitter=0.1)
    x = torch.randn(50, 8)
    router.eval()
    torch.testing.assert_close(router.logits(x), router.logits(x))
    router.train()
    a, b = router.logits(x), router.logits(x)
    assert not torch.equal(a, b)
    # jitter multiplies x elementwise by U(0.9, 1.1): x_j = x * u with |u - 1| <= 0.1
    torch.manual_seed(3)
    noisy = router.router_input(x)
    ratio = noisy / x
    assert ((ratio >= 0.9 - 1e-6) & (ratio <= 1.1 + 1e-6)).all()


def test_switch_rejects_top_k_above_one():
    with pytest.raises(ValueError, match="top_k=2 must be 1"):
        ms.MoE(8, 16, 4, router="switch", top_k=2)


def test_switch_default_init_is_the_papers_truncated_normal():
    # Switch 2.4: sigma = sqrt(0.1 / fan_in), redraws beyond 2 sigma -> std ~ 0.88 sigma
    router = ms.ROUTERS["switch"](1024, 1024)
    sigma = math.sqrt(0.1 / 1024)
    w = router.gate.weight
    assert w.abs().max().item() <= 2 * sigma + 1e-9
    assert w.std().item() == pytest.approx(0.88 * sigma, rel=0.02)
