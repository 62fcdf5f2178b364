"""Expert weights are stored transposed in memory (nn.Linear's (out, in) order) with their public
(E, D, F) / (E, F, D) shapes; every layout computes what the per-token reference computes."""

from __future__ import annotations

import copy

import pytest
import torch

import moesaic as ms
from moesaic.experts.reference import reference_ffn
from moesaic.kernels.cpu import CpuBackend, gemm
from moesaic.kernels.cpu.tuning import DEFAULT_TUNING, CpuTuning
from moesaic.train.checkpoint import load_checkpoint, save_checkpoint
from tests.cases import expert_backend

COUNTS = [9, 0, 3, 17]  # an empty expert, one under MIN_ROWS (torch.mm), two on oneDNN


def _reference(x: torch.Tensor, experts: ms.Experts) -> torch.Tensor:
    owner = torch.repeat_interleave(torch.arange(len(COUNTS)), torch.tensor(COUNTS)).tolist()
    return torch.stack([reference_ffn(x[a], experts, e) for a, e in enumerate(owner)])


def _row_major(experts: ms.Experts) -> ms.Experts:
    """A copy whose weights are plain contiguous (E, K, N) tensors (the old layout)."""
    out = copy.deepcopy(experts)
    for name in ("w1", "w2", "w3"):
        w = getattr(out, name)
        if w is not None:
            w.data = w.data.contiguous()
    return out


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_weights_keep_their_shapes_and_are_stored_transposed(activation):
    experts = ms.Experts(3, 8, 20, activation)
    assert experts.w1.shape == (3, 8, 20) and experts.w1.stride() == (160, 1, 8)
    assert experts.w2.shape == (3, 20, 8) and experts.w2.stride() == (160, 1, 20)
    if activation == "swiglu":
        assert experts.w3.shape == (3, 8, 20) and experts.w3.stride() == (160, 1, 8)
    for w in (experts.w1, experts.w2):
        assert w[1].t().is_contiguous() and not w.is_contiguous()
    # dtype casts and copies keep the layout
    assert experts.to(torch.bfloat16).w1.stride() == (160, 1, 8)
    assert copy.deepcopy(experts).w2.stride() == (160, 1, 20)


@pytest.mark.parametrize("gemm_backend", ["torch", "onednn"])
@pytest.mark.parametrize("impl", ["loop", "threads"])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_both_layouts_equal_the_reference_forward_and_backward(activation, impl, gemm_backend):
    # without oneDNN in the torch build, gemm="onednn" runs on torch.mm: the same must hold
    torch.manual_seed(0)
    new = ms.Experts(4, 16, 40, activation, bias=True, backend=expert_backend(impl, gemm_backend))
    old = _row_major(new)
    assert old.w1.is_contiguous() and not new.w1.is_contiguous()
    x = torch.randn(sum(COUNTS), 16)
    g = torch.randn(sum(COUNTS), 16)
    with torch.no_grad():
        expected = _reference(x, new)
        for experts in (new, old):
            torch.testing.assert_close(experts(x, COUNTS), expected, rtol=1e-4, atol=1e-5)
    ref = copy.deepcopy(new)
    xr = x.clone().requires_grad_()
    _reference(xr, ref).backward(g)
    for experts in (new, old):
        xi = x.clone().requires_grad_()
        experts(xi, COUNTS).backward(g)
        torch.testing.assert_close(xi.grad, xr.grad, rtol=1e-4, atol=1e-5)
        for name, p in experts.named_parameters():
            expected_grad = getattr(ref, name).grad
            torch.testing.assert_close(p.grad, expected_grad, rtol=1e-4, atol=1e-5, msg=name)
            assert p.grad.stride() == p.stride(), name  # gradients in the weight's own layout


@pytest.mark.parametrize("onednn", [None, DEFAULT_TUNING], ids=["torch", "onednn"])
def test_matmul_writes_a_transposed_out_in_its_own_order(onednn):
    if onednn and not gemm.onednn_available():
        pytest.skip("this torch build has no oneDNN (x86 wheels all do)")
    torch.manual_seed(0)
    a, b = torch.randn(24, 12), torch.randn(12, 20)
    out_NM = torch.full((20, 24), float("nan"))
    out = out_NM.t()  # (24, 20), stored transposed like a weight gradient
    result = gemm.matmul(a, b, onednn=onednn, out=out)
    assert result.data_ptr() == out_NM.data_ptr()
    torch.testing.assert_close(out, a @ b, rtol=1e-5, atol=1e-5)


def test_checkpoint_round_trip_keeps_values_and_layout(tmp_path):
    torch.manual_seed(0)
    layer = ms.MoE(16, 32, 4, router="topk", top_k=2)
    path = save_checkpoint(tmp_path, 1, layer, {"step": 1})
    other = ms.MoE(16, 32, 4, router="topk", top_k=2)
    load_checkpoint(path, other)
    for (name, p), q in zip(layer.named_parameters(), other.parameters()):
        assert torch.equal(p, q), name
        assert p.stride() == q.stride(), name
    x = torch.randn(10, 16)
    with torch.no_grad():
        torch.testing.assert_close(other(x), layer(x), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["auto", "onednn"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_forward_only_swapped_products_equal_the_reference(
    activation, bias, dtype, backend, monkeypatch
):
    swapped = []
    real = gemm._swapped
    monkeypatch.setattr(gemm, "_swapped", lambda *a, **k: swapped.append(1) or real(*a, **k))
    # the 9-row expert swaps (not the 3- or 17-row ones), whatever its padding to 16
    tuning = CpuTuning(gemm=backend, swap_rows=(4, 10), swap_pad=15)
    torch.manual_seed(0)
    experts = ms.Experts(4, 16, 40, activation, bias=bias, backend=CpuBackend(tuning)).to(dtype)
    x = torch.randn(sum(COUNTS), 16).to(dtype)
    with torch.inference_mode():
        got = experts(x, COUNTS)
    # fp32 experts this small stay on torch.mm (MKL) under "auto", which never swaps; bf16
    # never swaps, nor does a torch build without oneDNN
    products = 3 if activation == "swiglu" else 2
    swaps = backend == "onednn" and dtype == torch.float32 and gemm.onednn_available()
    assert len(swapped) == (products if swaps else 0)
    tol = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {"rtol": 1e-4, "atol": 1e-5}
    torch.testing.assert_close(got.float(), _reference(x.float(), experts.float()), **tol)


def test_swapped_products_are_fp32_ones_at_or_just_under_a_multiple_of_16_rows():
    # the rule alone (no product runs), so it holds on any torch build
    w = ms.Experts(1, 16, 40, "gelu").w1[0]
    assert DEFAULT_TUNING.swap_rows == (16, 128) and DEFAULT_TUNING.swap_pad == 2
    swaps = [m for m in range(1, 160) if gemm._swaps(torch.empty(m, 16), w, onednn=DEFAULT_TUNING)]
    expected = [m for m in range(16, 129) if m % 16 in (0, 14, 15)]
    assert swaps == expected
    assert not gemm._swaps(torch.empty(64, 16), w, onednn=None)
    assert not gemm._swaps(torch.empty(64, 16), w.contiguous(), onednn=DEFAULT_TUNING)
    w16 = w.to(torch.bfloat16)
    assert not gemm._swaps(torch.empty(64, 16, dtype=torch.bfloat16), w16, onednn=DEFAULT_TUNING)


def test_the_layer_forward_only_with_swapped_products_equals_its_training_forward():
    torch.manual_seed(0)
    # ~32 rows per expert, and every expert of 16-128 rows swaps
    swapping = CpuBackend(CpuTuning(gemm="onednn", swap_pad=15))
    layer = ms.MoE(512, 1024, 16, router="topk", top_k=2, expert_backend=swapping)
    x = torch.randn(256, 512)
    with torch.inference_mode():
        fast = layer(x)
    torch.testing.assert_close(fast, layer(x).detach(), rtol=1e-4, atol=1e-5)
