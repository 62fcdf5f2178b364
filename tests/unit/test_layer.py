"""The MoE layer against its oracles: a dense FFN and experts/reference.py."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import moesaic as ms
from moesaic.experts.reference import reference_ffn, reference_moe
from tests.cases import ROUTER_CASES, RouterCase, capture_routing

PARAMS = (
    "experts.w1",
    "experts.w2",
    "experts.w3",
    "router.gate.weight",
    "router.noise.weight",
    "router.task_embedding.weight",
)


def _grads(layer: ms.MoE, x: torch.Tensor, out: torch.Tensor, g: torch.Tensor):
    named = dict(layer.named_parameters())
    params = [x] + [named[n] for n in PARAMS if n in named]
    return torch.autograd.grad((out * g).sum(), params, retain_graph=True, allow_unused=True)


@pytest.mark.parametrize("activation", ["gelu", "relu", "silu", "swiglu"])
@pytest.mark.parametrize("router", ["switch", "topk"])
def test_one_expert_moe_equals_a_dense_ffn_outputs_and_grads(activation, router):
    D, Fh = 12, 24
    layer = ms.MoE(D, Fh, 1, router=router, top_k=1, activation=activation, jitter=0.0)
    lin1, lin2 = nn.Linear(D, Fh, bias=False), nn.Linear(Fh, D, bias=False)
    lin3 = nn.Linear(D, Fh, bias=False)
    with torch.no_grad():
        lin1.weight.copy_(layer.experts.w1[0].t())
        lin2.weight.copy_(layer.experts.w2[0].t())
        if activation == "swiglu":
            lin3.weight.copy_(layer.experts.w3[0].t())

    def dense(x):
        h = lin1(x)
        h = F.silu(h) * lin3(x) if activation == "swiglu" else getattr(F, activation)(h)
        return lin2(h)

    x = torch.randn(3, 7, D)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_moe, y_dense = layer(x1), dense(x2)
    torch.testing.assert_close(y_moe, y_dense)
    g = torch.randn_like(y_moe)
    (y_moe * g).sum().backward()
    (y_dense * g).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(layer.experts.w1.grad[0], lin1.weight.grad.t())
    torch.testing.assert_close(layer.experts.w2.grad[0], lin2.weight.grad.t())
    if activation == "swiglu":
        torch.testing.assert_close(layer.experts.w3.grad[0], lin3.weight.grad.t())


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("drop_policy", ["position", "priority"])
@pytest.mark.parametrize("capacity_factor", [None, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("case", ROUTER_CASES, ids=lambda c: c.id)
def test_every_router_and_capacity_equals_the_reference(
    case: RouterCase, capacity_factor, drop_policy, training
):
    layer = case.layer(capacity_factor=capacity_factor, drop_policy=drop_policy)
    layer.train(training)
    seen = capture_routing(layer)
    x = torch.randn(3, 5, 8, requires_grad=True)
    with case.context(batch=3):
        y = layer(x)
    routing = seen[-1]
    ref = reference_moe(x.reshape(-1, 8), routing, layer.experts, layer.capacity(15), drop_policy)
    torch.testing.assert_close(y.reshape(-1, 8), ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    for got, want in zip(_grads(layer, x, y, g), _grads(layer, x, ref.view_as(y), g)):
        if got is None or want is None:
            assert got is None or not got.any(), "a gradient the reference does not have"
            continue
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ROUTER_CASES, ids=lambda c: c.id)
def test_any_leading_shape_round_trips(case: RouterCase):
    layer = case.layer().eval()
    x = torch.randn(3, 2, 5, 8)
    with case.context(batch=3):
        assert layer(x).shape == x.shape
    if not case.needs_task:
        assert layer(x[0, 0, 0]).shape == (8,)


def test_tokens_dropped_by_capacity_get_exactly_zero():
    # Fedus et al. 2022 (Switch): T=1024, E=8, cf=1.25 -> C=160; all tokens pick expert 0.
    layer = ms.MoE(4, 8, 8, router="switch", capacity_factor=1.25, jitter=0.0)
    with torch.no_grad():
        layer.router.gate.weight.zero_()
        layer.router.gate.weight[0] = 1.0
    x = torch.rand(1024, 4) + 0.1  # positive inputs: expert 0's logit is the largest
    y = layer(x)
    assert layer.capacity(1024) == 160
    assert layer.last_stats.tokens_per_expert.tolist() == [160] + [0] * 7
    assert layer.last_stats.requested_per_expert.tolist() == [1024] + [0] * 7
    assert layer.last_stats.dropped_fraction == pytest.approx(864 / 1024)
    assert torch.equal(y[160:], torch.zeros_like(y[160:]))
    assert (y[:160].abs().sum(dim=1) > 0).all()


def test_gradients_reach_the_router_through_the_combine_weights():
    layer = ms.MoE(8, 16, 4, router="topk", top_k=2, aux_loss_weight=0.0)
    layer(torch.randn(20, 8)).pow(2).sum().backward()
    assert layer.router.gate.weight.grad.abs().sum() > 0


def test_aux_loss_is_weighted_and_summed_over_layers():
    model = nn.Sequential(
        ms.MoE(8, 16, 4, router="switch", aux_loss_weight=0.1, z_loss_weight=0.01),
        ms.MoE(8, 16, 4, router="topk", aux_loss_weight=0.5),
    )
    seen0, seen1 = capture_routing(model[0]), capture_routing(model[1])
    model(torch.randn(10, 8))
    r0, r1 = seen0[-1], seen1[-1]
    torch.testing.assert_close(model[0].aux_loss, 0.1 * r0.aux_loss + 0.01 * r0.z_loss)
    torch.testing.assert_close(model[1].aux_loss, 0.5 * r1.aux_loss)
    torch.testing.assert_close(ms.aux_loss(model), model[0].aux_loss + model[1].aux_loss)
    assert ms.aux_loss(nn.Linear(2, 2)).item() == 0.0


def test_shared_expert_adds_a_dense_ffn_to_every_token():
    layer = ms.MoE(8, 16, 4, router="topk", top_k=1, shared_d_ff=32)
    x = torch.randn(6, 8)
    seen = capture_routing(layer)
    y = layer(x)
    sparse = reference_moe(x, seen[-1], layer.experts)
    shared = F.gelu(x @ layer.shared.w1[0]) @ layer.shared.w2[0]
    torch.testing.assert_close(y, sparse + shared, atol=1e-5, rtol=1e-5)


def test_shared_gate_scales_the_shared_expert_by_a_sigmoid_outputs_and_grads():
    """Qwen2-MoE's shared expert: y = routed(x) + sigmoid(x w) * shared(x), against a slow
    reference built token by token from the same routing, gradients included."""
    torch.manual_seed(0)
    layer = ms.MoE(8, 16, 4, router="topk", top_k=2, activation="swiglu", shared_d_ff=12)
    gated = ms.MoE(
        8, 16, 4, router="topk", top_k=2, activation="swiglu", shared_d_ff=12, shared_gate=True
    )
    assert layer.shared_gate is None and gated.shared_gate.weight.shape == (1, 8)
    gated.load_state_dict(layer.state_dict() | {"shared_gate.weight": torch.randn(1, 8)})
    x = torch.randn(6, 8, requires_grad=True)
    seen = capture_routing(gated)
    y = gated(x)
    shared = torch.stack([reference_ffn(x[t], gated.shared, 0) for t in range(6)])
    gate_T1 = torch.sigmoid(x @ gated.shared_gate.weight.t())
    want = reference_moe(x, seen[-1], gated.experts) + gate_T1 * shared
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(y, layer(x))  # the gate is not 1
    params = [x, gated.shared_gate.weight, gated.shared.w1, gated.experts.w1]
    g = torch.randn_like(y)
    got = torch.autograd.grad((y * g).sum(), params, retain_graph=True)
    ref = torch.autograd.grad((want * g).sum(), params)
    for name, a, b in zip(["x", "shared_gate", "shared.w1", "experts.w1"], got, ref):
        assert a.abs().sum() > 0, name
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)


def test_bf16_activations_keep_the_router_in_fp32():
    layer = ms.MoE(16, 32, 4, router="topk", top_k=2)
    x = torch.randn(2, 9, 16)
    y32 = layer(x)
    layer = layer.to(torch.bfloat16)
    seen = capture_routing(layer)
    y16 = layer(x.bfloat16())
    assert y16.dtype == torch.bfloat16
    assert seen[-1].probs_TE.dtype == torch.float32
    assert seen[-1].weight.dtype == torch.float32
    torch.testing.assert_close(y16.float(), y32, atol=0.05, rtol=0.05)
    y16.float().sum().backward()
    assert layer.router.gate.weight.grad.dtype == torch.bfloat16


def test_autocast_runs_experts_in_bf16_and_the_router_in_fp32():
    layer = ms.MoE(16, 32, 4, router="switch")
    seen = capture_routing(layer)
    x = torch.randn(2, 9, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert seen[-1].probs_TE.dtype == torch.float32
    y.float().sum().backward()
    assert layer.experts.w1.grad.dtype == torch.float32


def test_router_dtype_float64_is_honoured():
    layer = ms.MoE(8, 16, 4, router="topk", router_dtype=torch.float64)
    seen = capture_routing(layer)
    layer(torch.randn(5, 8))
    assert seen[-1].probs_TE.dtype == torch.float64


def test_state_dict_round_trips_into_a_fresh_layer():
    a = ms.MoE(8, 16, 4, router="noisy_topk", activation="swiglu").eval()
    b = ms.MoE(8, 16, 4, router="noisy_topk", activation="swiglu").eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(7, 8)
    torch.testing.assert_close(a(x), b(x))
    assert {
        "router.gate.weight",
        "router.noise.weight",
        "experts.w1",
        "experts.w2",
        "experts.w3",
    } == set(a.state_dict())


def test_expert_that_receives_no_tokens_gets_zero_gradient():
    layer = ms.MoE(4, 8, 4, router="switch", jitter=0.0)
    with torch.no_grad():
        layer.router.gate.weight.zero_()
        layer.router.gate.weight[2] = 1.0
    layer(torch.rand(6, 4) + 0.1).sum().backward()
    g = layer.experts.w1.grad
    assert g[2].abs().sum() > 0
    assert torch.equal(g[[0, 1, 3]], torch.zeros_like(g[[0, 1, 3]]))


def test_empty_batch_gives_an_empty_output():
    layer = ms.MoE(8, 16, 4, router="topk", capacity_factor=1.0)
    y = layer(torch.randn(0, 8))
    assert y.shape == (0, 8)
    assert layer.last_stats.dropped_fraction == 0.0


def test_a_layer_can_be_deep_copied_after_a_forward():
    layer = ms.MoE(8, 16, 4)
    assert layer.aux_loss.item() == 0.0 and layer.last_stats is None
    layer(torch.randn(5, 8))
    twin = copy.deepcopy(layer)
    assert twin.last_stats is None and twin.aux_loss.item() == 0.0
    x = torch.randn(5, 8)
    torch.testing.assert_close(twin.eval()(x), layer.eval()(x))


def test_the_router_battery_covers_every_registered_router():
    """A router added to ``ms.ROUTERS`` cannot skip the battery above: it needs a RouterCase."""
    assert {case.router for case in ROUTER_CASES} == set(ms.ROUTERS)
