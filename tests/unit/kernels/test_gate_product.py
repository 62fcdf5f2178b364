"""The routers' gate product ``x @ W_g^T``: on oneDNN for large fp32 batches on CPU, torch.mm
otherwise; both must equal a float64 reference forward and backward."""

import dataclasses

import pytest
import torch

import moesaic.kernels.cpu.gemm as gemm
import moesaic.routing.gate as gate
from moesaic.context import RoutingContext
from moesaic.kernels.cpu import DEFAULT_TUNING, cpu_capability
from moesaic.routing.noisy import NoisyTopKRouter
from moesaic.routing.topk import TopKRouter

T_BIG = DEFAULT_TUNING.gate_min_rows + 37  # not a multiple of any block size


def _reference(x, w):
    """Logits and gradients in float64 for an upstream gradient g."""
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    return x64, w64, x64 @ w64.t()


@pytest.fixture
def spy(monkeypatch):
    """The (a, b) shapes of every product that runs on oneDNN."""
    calls = []
    real = gemm._fits

    def recording(tuning, a, b):
        ok = real(tuning, a, b)
        if ok:
            calls.append((tuple(a.shape), tuple(b.shape)))
        return ok

    monkeypatch.setattr(gemm, "_fits", recording)
    return calls


@pytest.mark.parametrize("tokens", [T_BIG, 7])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_gate_logits_and_gradients_equal_the_reference(tokens, x_dtype):
    torch.manual_seed(0)
    router = TopKRouter(64, 8)
    x = torch.randn(tokens, 64).to(x_dtype).requires_grad_()
    logits = router.logits(x)
    assert logits.dtype == torch.float32
    g = torch.randn_like(logits)
    logits.backward(g)
    x64, w64, ref = _reference(x, router.gate.weight)
    ref.backward(g.double())
    torch.testing.assert_close(logits.double(), ref, rtol=1e-5, atol=1e-5)
    tol = 1e-5 if x_dtype == torch.float32 else 2e-2
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=tol, atol=tol)
    assert x.grad.dtype == x_dtype
    torch.testing.assert_close(router.gate.weight.grad.double(), w64.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("vendor", ["AMD", "Intel", "other"])
def test_large_fp32_batches_run_the_gate_on_onednn_small_ones_on_torch_mm(spy, monkeypatch, vendor):
    cap = dataclasses.replace(cpu_capability(), vendor=vendor)
    monkeypatch.setattr(gemm, "cpu_capability", lambda: cap)
    torch.manual_seed(0)
    router = TopKRouter(64, 8)
    x = torch.randn(T_BIG, 64, requires_grad=True)
    router.logits(x).sum().backward()
    # forward, grad x and grad w all on oneDNN where it runs and measured faster (not on Intel,
    # whose MKL won every size); else every product on torch.mm
    if gemm.onednn_available() and vendor != "Intel":
        assert len(spy) == 3
        assert spy[0] == ((T_BIG, 64), (64, 8))
    else:
        assert spy == []
    spy.clear()
    router.logits(torch.randn(7, 64, requires_grad=True)).sum().backward()
    assert spy == []
    wide = TopKRouter(64, 8, router_dtype=torch.float64)
    with torch.no_grad():
        wide.logits(torch.randn(T_BIG, 64))
    assert spy == []  # float64 router math stays on torch.mm


def test_gate_on_onednn_routes_like_torch_mm(monkeypatch):
    """The same routing decisions with the CPU kernels' gate product unregistered (the logits
    differ by rounding only)."""
    torch.manual_seed(0)
    router = NoisyTopKRouter(64, 16, top_k=2).eval()
    x = torch.randn(T_BIG, 64)
    with torch.no_grad():
        fast = router(x, RoutingContext())
        monkeypatch.setattr(gate, "_PRODUCTS", [])
        slow = router(x, RoutingContext())
    assert torch.equal(fast.expert, slow.expert)
    torch.testing.assert_close(fast.weight, slow.weight)
