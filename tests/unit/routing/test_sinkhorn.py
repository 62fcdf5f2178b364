"""Sinkhorn routing: the plan's marginals, the fixed point, top-k of the plan in training."""

import math

import pytest
import torch

import moesaic as ms
from moesaic.routing.sinkhorn import sinkhorn
from tests.unit.routing._util import identity_gate, route


def _reference_plan(logits_TE: torch.Tensor, sweeps: int = 5000) -> torch.Tensor:
    """Sinkhorn and Knopp as written: divide every row of exp(logits) by T times its sum, then
    every column by E times its sum, over and over (float64, no log domain)."""
    P = logits_TE.double().exp()
    T, E = P.shape
    for _ in range(sweeps):
        P = P / (T * P.sum(dim=1, keepdim=True))
        P = P / (E * P.sum(dim=0, keepdim=True))
    return P / (T * P.sum(dim=1, keepdim=True))


@pytest.mark.parametrize("tol", [1e-1, 1e-2, 1e-4])
@pytest.mark.parametrize("T,E", [(64, 8), (50, 7), (5, 16)])
def test_rows_carry_one_over_t_and_columns_one_over_e_within_tol(T, E, tol):
    logits = 2.0 * torch.randn(T, E)
    plan = sinkhorn(logits, iters=10_000, tol=tol)
    torch.testing.assert_close(plan.sum(dim=1), torch.full((T,), 1.0 / T), rtol=1e-5, atol=0)
    assert (E * plan.sum(dim=0) - 1).abs().max() <= tol + 1e-6


def test_the_plan_is_the_sinkhorn_fixed_point():
    logits = 3.0 * torch.randn(40, 6, dtype=torch.float64)
    plan = sinkhorn(logits, iters=10_000, tol=1e-12)
    torch.testing.assert_close(plan, _reference_plan(logits), rtol=1e-8, atol=0)


def test_the_plan_scales_rows_and_columns_of_exp_logits():
    # P = diag(r) exp(logits) diag(c): every 2x2 cross ratio of P equals that of exp(logits)
    logits = torch.randn(12, 5, dtype=torch.float64)
    plan = sinkhorn(logits, iters=3)
    ratio = plan[:, :1] * plan[:1, :] / (plan * plan[:1, :1])
    want = (logits[:, :1] + logits[:1, :] - logits - logits[:1, :1]).exp()
    torch.testing.assert_close(ratio, want)


def test_running_out_of_iterations_still_gives_exact_rows():
    logits = 5.0 * torch.randn(30, 4)
    plan = sinkhorn(logits, iters=1, tol=0.0)
    torch.testing.assert_close(plan.sum(dim=1), torch.full((30,), 1.0 / 30), rtol=1e-5, atol=0)


def test_huge_logits_do_not_overflow():
    logits = torch.randn(20, 4) * 1000.0
    plan = sinkhorn(logits, iters=500, tol=1e-3)
    assert torch.isfinite(plan).all()
    # float32 logits near 1000 carry a relative rounding error of about 1e-4 into exp
    torch.testing.assert_close(plan.sum(dim=1), torch.full((20,), 1.0 / 20), rtol=1e-3, atol=0)
    unbalanced = logits.softmax(dim=1) / 20  # rows at 1/T, columns as they come
    error, before = (4 * plan.sum(0) - 1).abs().max(), (4 * unbalanced.sum(0) - 1).abs().max()
    assert error < 0.1 * before


@pytest.mark.parametrize("k", [1, 2])
def test_training_takes_the_top_k_of_the_plan_weighted_by_the_scores(k):
    E = 6
    router = ms.ROUTERS["sinkhorn"](E, E, k, sinkhorn_tol=1e-6, sinkhorn_iters=1000).train()
    identity_gate(router)
    x = torch.randn(40, E)
    x[:, 0] += 4.0  # skewed logits: plain top-k would crowd expert 0
    r = route(router, x)
    plan = _reference_plan(x)
    scores = x.sigmoid() if k == 1 else x.softmax(dim=-1)
    for j in range(k):
        picked = r.expert[r.choice == j]
        assert picked.tolist() == plan.topk(k, dim=1).indices[:, j].tolist()
        torch.testing.assert_close(
            r.weight[r.choice == j].detach(), scores.gather(1, picked[:, None])[:, 0]
        )
    plain = torch.bincount(x.argmax(dim=1), minlength=E)
    balanced = torch.bincount(r.expert[r.choice == 0], minlength=E)
    assert balanced.max() < plain.max()


@pytest.mark.parametrize("k", [1, 2])
def test_evaluation_takes_the_plain_top_k_of_the_scores(k):
    router = ms.ROUTERS["sinkhorn"](6, 6, k).eval()
    identity_gate(router)
    x = torch.randn(25, 6)
    x[:, 0] += 4.0
    r = route(router, x)
    want = x.topk(k, dim=1).indices
    for j in range(k):
        assert r.expert[r.choice == j].tolist() == want[:, j].tolist()


def test_the_gate_trains_through_the_weights_and_there_is_no_aux_loss():
    layer = ms.MoE(8, 16, 4, router="sinkhorn", top_k=2).train()
    layer(torch.randn(10, 8)).pow(2).sum().backward()
    assert layer.router.gate.weight.grad.abs().sum() > 0
    assert layer.aux_loss.item() == 0.0


@pytest.mark.parametrize(
    "options,error,match",
    [
        ({"sinkhorn_iters": 0}, ValueError, "sinkhorn_iters=0 must be >= 1"),
        ({"sinkhorn_tol": -1.0}, ValueError, "sinkhorn_tol=-1.0 must be a finite float >= 0"),
        ({"sinkhorn_tol": math.nan}, ValueError, "sinkhorn_tol=nan must be a finite float"),
        ({"score_func": "sigmoid"}, ValueError, "score_func: not available for router='sinkhorn'"),
    ],
)
def test_bad_options_are_named(options, error, match):
    with pytest.raises(error, match=match):
        ms.ROUTERS["sinkhorn"](8, 4, **options)
