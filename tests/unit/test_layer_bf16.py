"""The layer in bf16 against experts/reference.py run in fp32 on the same (bf16-rounded) weights.

Stated tolerance (docs/performance.md): outputs and gradients within atol = rtol = 2e-2 of the
fp32 reference (every case here also passes at 1e-2): a few bf16 ulps (2**-8 relative)
accumulated over two matmuls.
"""

from __future__ import annotations

import copy

import pytest
import torch

from moesaic.experts.reference import reference_moe
from tests.cases import ROUTER_CASES, RouterCase, capture_routing

TOL = {"atol": 2e-2, "rtol": 2e-2}
EXPERT_PARAMS = ("w1", "w2", "w3")


def _router_params(layer):
    return [p for n, p in layer.router.named_parameters()]


@pytest.mark.parametrize("shape", [(1, 1, 8), (3, 5, 8)], ids=["T1", "T15"])
@pytest.mark.parametrize("capacity_factor", [None, 1.0])
@pytest.mark.parametrize("case", ROUTER_CASES, ids=lambda c: c.id)
def test_bf16_layer_equals_the_fp32_reference(case: RouterCase, capacity_factor, shape):
    torch.manual_seed(0)
    layer = case.layer(capacity_factor=capacity_factor).to(torch.bfloat16)
    seen = capture_routing(layer)
    x = torch.randn(shape, dtype=torch.bfloat16, requires_grad=True)
    with case.context(batch=shape[0]):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    routing = seen[-1]
    experts32 = copy.deepcopy(layer.experts).float()
    T = shape[0] * shape[1]
    ref = reference_moe(x.reshape(T, 8).float(), routing, experts32, layer.capacity(T), "position")
    torch.testing.assert_close(y.reshape(T, 8).float(), ref, **TOL)

    g = torch.randn(T, 8)
    fast_w = [
        getattr(layer.experts, n) for n in EXPERT_PARAMS if getattr(layer.experts, n) is not None
    ]
    ref_w = [getattr(experts32, n) for n in EXPERT_PARAMS if getattr(experts32, n) is not None]
    shared = [x, *_router_params(layer)]
    got = torch.autograd.grad(
        (y.reshape(T, 8).float() * g).sum(), shared + fast_w, allow_unused=True, retain_graph=True
    )
    want = torch.autograd.grad((ref * g).sum(), shared + ref_w, allow_unused=True)
    for a, b in zip(got, want):
        if a is None or b is None:
            assert (a is None or not a.any()) and (b is None or not b.any())
            continue
        torch.testing.assert_close(a.float(), b.float(), **TOL)


def test_bf16_expert_with_no_tokens_gets_an_exact_zero_gradient():
    layer = ROUTER_CASES[0].layer(num_experts=6).to(torch.bfloat16)
    with torch.no_grad():
        layer.router.gate.weight.zero_()
        layer.router.gate.weight[4] = 1.0
    layer(torch.rand(9, 8, dtype=torch.bfloat16) + 0.1).float().sum().backward()
    g = layer.experts.w1.grad
    assert g.dtype == torch.bfloat16
    assert g[4].abs().sum() > 0
    assert not g[[0, 1, 2, 3, 5]].any()
