"""The gradient pool recycles expert-weight gradients only when nobody else can see them."""

import copy
import io

import torch

import moesaic as ms
from moesaic.kernels.cpu import CpuBackend, CpuTuning


def _layer():
    torch.manual_seed(0)
    return ms.MoE(8, 16, 4, router="topk", top_k=2)


def _pool(layer):
    return layer.experts.kernel_state["cpu.grad_pool"]


def _backward(layer, x):
    layer(x).pow(2).sum().backward()


def test_memory_is_recycled_after_zero_grad_set_to_none_and_values_stay_exact():
    layer, x = _layer(), torch.randn(20, 8)
    fresh = copy.deepcopy(layer)
    fresh.experts.backend = CpuBackend(CpuTuning(recycle_grads=False))
    ptrs = []
    for _ in range(3):
        layer.zero_grad(set_to_none=True)
        fresh.zero_grad(set_to_none=True)
        _backward(layer, x)
        _backward(fresh, x)
        ptrs.append(layer.experts.w1.grad.data_ptr())
        for a, b in zip(layer.parameters(), fresh.parameters()):
            assert torch.equal(a.grad, b.grad)
    assert len(set(ptrs)) == 1


def test_gradient_accumulation_without_set_to_none_still_adds():
    layer, x = _layer(), torch.randn(20, 8)
    _backward(layer, x)
    once = layer.experts.w1.grad.clone()
    _backward(layer, x)
    torch.testing.assert_close(layer.experts.w1.grad, 2 * once)


def test_a_gradient_the_user_still_holds_is_never_overwritten():
    layer, x = _layer(), torch.randn(20, 8)
    _backward(layer, x)
    held = layer.experts.w2.grad
    snapshot = held.clone()
    layer.zero_grad(set_to_none=True)
    _backward(layer, 3 * x)
    assert torch.equal(held, snapshot)
    assert held.data_ptr() != layer.experts.w2.grad.data_ptr()


def test_a_live_view_blocks_reuse():
    layer, x = _layer(), torch.randn(20, 8)
    _backward(layer, x)
    first_expert = layer.experts.w1.grad[0]
    snapshot = first_expert.clone()
    layer.zero_grad(set_to_none=True)
    _backward(layer, 3 * x)
    assert torch.equal(first_expert, snapshot)


def test_copies_and_saved_modules_start_with_an_empty_pool():
    layer, x = _layer(), torch.randn(20, 8)
    _backward(layer, x)
    twin = copy.deepcopy(layer)
    assert _pool(twin)._held == {}
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert _pool(loaded)._held == {}
    loaded.zero_grad(set_to_none=True)
    _backward(loaded, x)
    assert loaded.experts.w1.grad is not None


def test_a_deep_copy_recycles_its_own_gradients():
    layer, x = _layer(), torch.randn(20, 8)
    twin = copy.deepcopy(layer)
    ptrs = []
    for _ in range(3):
        twin.zero_grad(set_to_none=True)
        _backward(twin, x)
        ptrs.append(twin.experts.w2.grad.data_ptr())
    assert len(set(ptrs)) == 1
