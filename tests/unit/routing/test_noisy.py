import math

import pytest
import torch

import moesaic as ms
from moesaic.routing.noisy import prob_in_topk
from tests.unit.routing._util import identity_gate, route


def test_noisy_topk_aux_loss_hand_worked_without_noise():
    # Eval mode (no noise), k=2, E=3, logits = x.
    # token 0: [ln3, 0, -5] keeps e0, e1 -> softmax over [ln3, 0] = [.75, .25]
    # token 1: [-5, 0, ln3] keeps e2, e1 -> [.75 on e2, .25 on e1]
    # Importance = [.75, .5, .75]: mean 2/3, var (1/144 + 1/144 + 4/144)/3 = 1/72 -> CV^2 = 1/32
    # Load (hard counts) = [1, 2, 1]: mean 4/3, var 2/9 -> CV^2 = 1/8;  aux = 5/32
    router = ms.ROUTERS["noisy_topk"](3, 3, 2).eval()
    identity_gate(router)
    l3 = math.log(3.0)
    r = route(router, torch.tensor([[l3, 0.0, -5.0], [-5.0, 0.0, l3]]))
    assert r.aux_loss.item() == pytest.approx(5 / 32, abs=1e-6)
    torch.testing.assert_close(r.weight, torch.tensor([0.75, 0.75, 0.25, 0.25]))
    assert r.expert.tolist() == [0, 2, 1, 1]


def test_zero_init_gives_balanced_load_in_training():
    # Shazeer et al. 2017: W_g = W_noise = 0 -> all signal is noise -> CV(load) < 0.05.
    router = ms.ROUTERS["noisy_topk"](16, 8, 2).train()
    assert not router.gate.weight.any() and not router.noise.weight.any()
    r = route(router, torch.randn(10_000, 16))
    load = torch.bincount(r.expert, minlength=8).float()
    assert (load.std(correction=0) / load.mean()).item() < 0.05


def test_gates_are_k_sparse_and_sum_to_one():
    router = ms.ROUTERS["noisy_topk"](8, 6, 3).train()
    torch.nn.init.normal_(router.gate.weight)
    r = route(router, torch.randn(50, 8))
    assert ((r.probs_TE > 0).sum(-1) == 3).all()
    torch.testing.assert_close(r.probs_TE.sum(-1), torch.ones(50))


def test_smooth_load_matches_monte_carlo_and_beats_the_naive_threshold():
    # Shazeer et al. 2017: redraw only expert i's noise, count how often i lands in the top k.
    torch.manual_seed(1)
    T, E, K, M = 300, 8, 2, 2000
    clean = torch.randn(T, E)
    std = torch.nn.functional.softplus(torch.randn(T, E))
    noisy = clean + torch.randn(T, E) * std
    top_val, top_idx = noisy.topk(K + 1, dim=-1)
    analytic = prob_in_topk(clean, std, top_val, top_idx[:, :K])
    mc = torch.empty(T, E)
    for i in range(E):
        others = torch.cat([noisy[:, :i], noisy[:, i + 1 :]], dim=1)  # (T, E-1)
        h_i = clean[:, i] + torch.randn(M, T) * std[:, i]  # (M, T)
        rank = (others[None] > h_i[..., None]).sum(-1)  # how many others beat the redrawn h_i
        mc[:, i] = (rank < K).float().mean(0)
    naive = torch.special.ndtr((clean - top_val[:, K - 1 : K]) / std)
    err = (analytic - mc).abs().mean().item()
    assert err < 0.02
    assert (naive - mc).abs().mean().item() > 2 * err
    # and the per-expert Load sums agree within 2%
    torch.testing.assert_close(analytic.sum(0), mc.sum(0), rtol=0.02, atol=0.5)


def test_importance_loss_has_zero_gradient_at_uniform_importance():
    # Shazeer et al. 2017
    from moesaic.routing.losses import cv_squared

    v = torch.full((8,), 3.0, requires_grad=True)
    loss = cv_squared(v)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(v.grad).all() and v.grad.abs().max() == 0


def test_noise_only_in_training():
    router = ms.ROUTERS["noisy_topk"](8, 4, 1)
    torch.nn.init.normal_(router.gate.weight)
    x = torch.randn(40, 8)
    router.eval()
    assert torch.equal(route(router, x).expert, route(router, x).expert)
    router.train()
    torch.nn.init.normal_(router.noise.weight, std=3.0)
    assert not torch.equal(route(router, x).expert, route(router, x).expert)
