"""The CPU backend's blocked run of a 1-expert module on long inputs (the shared expert)."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

import moesaic as ms
from moesaic.experts.reference import reference_moe
from moesaic.kernels.cpu import CpuBackend, CpuTuning
from tests.cases import capture_routing


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_long_inputs_run_the_shared_expert_in_blocks_with_the_same_result(activation, monkeypatch):
    """The CPU backend runs a 1-expert module (the shared expert) on long inputs in blocks: 4
    tokens over 30 (the last one short) against the dense formula; gradients equal over two
    accumulating steps (the gradient pool recycles memory between steps)."""
    torch.manual_seed(0)
    layer = ms.MoE(8, 16, 4, router="topk", top_k=2, shared_d_ff=12, activation=activation)
    calls: list[int] = []
    run = CpuBackend.run

    def spy(self, experts, x_AD, counts, **kw):
        if experts is layer.shared:
            calls.append(x_AD.shape[0])
        return run(self, experts, x_AD, counts, **kw)

    monkeypatch.setattr(CpuBackend, "run", spy)
    x = torch.randn(30, 8)
    g = torch.randn(30, 8)
    grads = []
    for block in (4, 10**6):
        layer.shared.backend = CpuBackend(CpuTuning(shared_block=block))
        layer.zero_grad(set_to_none=True)
        for _ in range(2):
            xi = x.clone().requires_grad_()
            (layer(xi) * g).sum().backward()
        grads.append([xi.grad] + [p.grad.clone() for p in layer.shared.parameters()])
        if block == 4:
            assert calls == [4] * 7 + [2] + [4] * 7 + [2]
            seen = capture_routing(layer)
            with torch.no_grad():
                y = layer(x)
            shared = layer.shared
            h = x @ shared.w1[0]
            h = F.silu(h) * (x @ shared.w3[0]) if activation == "swiglu" else F.gelu(h)
            want = reference_moe(x, seen[-1], layer.experts) + h @ shared.w2[0]
            torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
