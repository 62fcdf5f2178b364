"""Forward-only un-permute + combine fused into the expert loop (fused.ScatterCombine)
against the unfused combine and experts/reference.py."""

from __future__ import annotations

import pytest
import torch

import moesaic as ms
from moesaic.dispatch import combine, make_plan
from moesaic.dispatch.capacity import DROP_POLICIES
from moesaic.experts.reference import reference_moe
from moesaic.kernels.cpu import combine as fused
from moesaic.kernels.cpu import threads as expert_threads
from moesaic.kernels.cpu.combine import ScatterCombine, scatter_combine
from moesaic.routing.base import Routing
from tests.cases import ROUTER_CASES, RouterCase, capture_routing, expert_backend


def _topk_plan(T: int, E: int, K: int, capacity: int | None = None):
    torch.manual_seed(T * 100 + E * 10 + K)
    logits = torch.randn(T, E)
    weight, expert = logits.softmax(-1).topk(K, dim=-1)
    zero = torch.zeros(())
    routing = Routing.from_topk(weight, expert, logits.softmax(-1), zero, zero)
    return make_plan(routing, E, T, capacity, DROP_POLICIES["position"]())


@pytest.mark.parametrize("K", [1, 2, 3])
@pytest.mark.parametrize("split", ["one call", "per expert", "reversed experts"])
def test_scatter_combine_equals_combine(K, split):
    T, E, D = 37, 5, 6
    plan = _topk_plan(T, E, K)
    y_AD = torch.randn(plan.token.shape[0], D)
    want = combine(y_AD, plan)
    sink = ScatterCombine(plan, y_AD)
    starts = [sum(plan.counts[:e]) for e in range(E)]
    pieces = [slice(0, y_AD.shape[0])]
    if split != "one call":
        pieces = [slice(s, s + n) for s, n in zip(starts, plan.counts)]
    if split == "reversed experts":
        pieces = pieces[::-1]  # the order worker threads may finish in
    for rows in pieces:
        sink(rows, y_AD[rows].clone())
    got = sink.result()
    assert got.shape == (T, D)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_plans_without_slot_get_no_sink():
    plan = _topk_plan(40, 4, 2, capacity=3)  # capacity drops assignments: no slot
    assert plan.slot is None and plan.source is None
    assert scatter_combine(plan, torch.zeros(1, 4)) is None
    with pytest.raises(ValueError, match="slot"):
        ScatterCombine(plan, torch.zeros(1, 4))


def _count_sinks(monkeypatch) -> list[int]:
    made: list[int] = []
    original = fused.ScatterCombine.__init__

    def init(self, plan, like):
        made.append(plan.top_k)
        original(self, plan, like)

    monkeypatch.setattr(fused.ScatterCombine, "__init__", init)
    return made


@pytest.mark.parametrize("mode", ["inference_mode", "no_grad", "frozen"])
@pytest.mark.parametrize("capacity_factor", [None, 1.0])
@pytest.mark.parametrize("case", ROUTER_CASES, ids=lambda c: c.id)
def test_forward_only_equals_the_reference(case: RouterCase, capacity_factor, mode, monkeypatch):
    made = _count_sinks(monkeypatch)
    layer = case.layer(capacity_factor=capacity_factor).eval()
    if mode == "frozen":
        layer.requires_grad_(False)
    seen = capture_routing(layer)
    x = torch.randn(3, 5, 8)
    ctx = torch.inference_mode() if mode == "inference_mode" else torch.no_grad()
    if mode == "frozen":
        ctx = torch.enable_grad()
    with ctx, case.context(batch=3):
        y = layer(x)
    routing = seen[-1]
    with torch.no_grad():
        ref = reference_moe(x.reshape(-1, 8), routing, layer.experts, layer.capacity(15))
    torch.testing.assert_close(y.reshape(-1, 8), ref, atol=1e-5, rtol=1e-5)
    plan_has_slot = capacity_factor is None and routing.dense_k is not None
    assert made == ([routing.dense_k] if plan_has_slot else [])


@pytest.mark.parametrize("impl", ["loop", "threads", "grouped"])
@pytest.mark.parametrize("gemm", ["torch", "onednn"])
@pytest.mark.parametrize("K", [1, 2])
def test_fused_forward_equals_the_training_forward(impl, gemm, K, monkeypatch):
    """Sizes above oneDNN's row threshold, one expert empty, every product path; "threads" on
    two worker threads whatever the size rule says (the sink is called from both); "grouped"
    has no fused path and combines afterwards."""
    made = _count_sinks(monkeypatch)
    orders: list = []
    if impl == "threads":
        expert_order = expert_threads.expert_order
        monkeypatch.setattr(
            expert_threads, "expert_order", lambda *a: orders.append(expert_order(*a)) or orders[-1]
        )
        threads = torch.get_num_threads()
        torch.set_num_threads(2)
    torch.manual_seed(K)
    layer = ms.MoE(16, 32, 4, router="topk", top_k=K, expert_backend=expert_backend(impl, gemm))
    x = torch.randn(300, 16)
    x[:, 0] = 5.0
    with torch.no_grad():
        layer.router.gate.weight[3, 0] = -100.0  # expert 3 gets no token
    with torch.inference_mode():
        fused = layer(x)
    trained = layer(x.clone().requires_grad_())  # autograd path: (A, D) output, then combine
    if impl == "threads":
        torch.set_num_threads(threads)
        assert orders and all(o is not None for o in orders)  # workers ran every call
    assert made == ([] if impl == "grouped" else [K])
    assert layer.last_stats.tokens_per_expert[3] == 0
    torch.testing.assert_close(fused, trained.detach(), rtol=1e-6, atol=1e-6)


def test_sink_refuses_a_recording_call():
    layer = ms.MoE(8, 16, 2, router="topk", top_k=1)
    x = torch.randn(6, 8)
    plan = _topk_plan(6, 2, 1)
    backend = layer.experts.backend_for(x)
    with pytest.raises(ValueError, match="forward-only"):
        backend.run(layer.experts, x[plan.token], plan.counts, sink=ScatterCombine(plan, x))
