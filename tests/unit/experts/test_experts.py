import pytest
import torch

import moesaic as ms
from moesaic.experts.reference import reference_ffn
from tests.cases import expert_backend


@pytest.mark.parametrize("impl", ["loop", "threads"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu", "silu", "swiglu"])
@pytest.mark.parametrize("counts", [[3, 0, 5, 2], [0, 0, 0, 4], [0, 0, 0, 0], [1, 1, 1, 1]])
def test_sliced_experts_equal_the_per_token_reference(activation, counts, bias, impl):
    experts = ms.Experts(4, 6, 10, activation, bias=bias, backend=expert_backend(impl))
    x = torch.randn(sum(counts), 6, requires_grad=True)
    y = experts(x, counts)
    owner = torch.repeat_interleave(torch.arange(4), torch.tensor(counts)).tolist()
    ref = (
        torch.stack([reference_ffn(x[a], experts, e) for a, e in enumerate(owner)])
        if owner
        else torch.zeros(0, 6)
    )
    torch.testing.assert_close(y, ref)
    if not owner:
        return
    g = torch.randn_like(y)
    params = [x] + list(experts.parameters())
    got = torch.autograd.grad((y * g).sum(), params)
    want = torch.autograd.grad((ref * g).sum(), params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_grouped_mm_path_equals_the_loop(activation, bias):
    experts = ms.Experts(4, 16, 32, activation, bias=bias, backend=expert_backend("loop"))
    grouped = ms.Experts(4, 16, 32, activation, bias=bias, backend=expert_backend("grouped"))
    grouped.load_state_dict(experts.state_dict())
    counts = [5, 0, 7, 4]
    x = torch.randn(16, 16)
    torch.testing.assert_close(grouped(x, counts), experts(x, counts), atol=1e-5, rtol=1e-5)


def test_frozen_experts_still_give_input_gradients():
    experts = ms.Experts(2, 4, 8).requires_grad_(False)
    x = torch.randn(5, 4, requires_grad=True)
    experts(x, [2, 3]).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_inference_mode_forward_needs_no_autograd():
    experts = ms.Experts(2, 4, 8)
    with torch.inference_mode():
        y = experts(torch.randn(5, 4), [2, 3])
    assert not y.requires_grad


def test_parameter_names_and_shapes_are_the_public_contract():
    e = ms.Experts(3, 4, 5, "swiglu")
    assert {n: tuple(p.shape) for n, p in e.named_parameters()} == {
        "w1": (3, 4, 5),
        "w2": (3, 5, 4),
        "w3": (3, 4, 5),
    }
    assert "w3" not in dict(ms.Experts(3, 4, 5).named_parameters())


def test_bias_names_and_shapes_are_public_and_a_non_bool_bias_is_rejected():
    e = ms.Experts(3, 4, 5, "swiglu", bias=True)
    shapes = {n: tuple(p.shape) for n, p in e.named_parameters()}
    assert (shapes["b1"], shapes["b2"], shapes["b3"]) == ((3, 5), (3, 4), (3, 5))
    assert "b3" not in dict(ms.Experts(3, 4, 5, bias=True).named_parameters())
    with pytest.raises(TypeError, match="bias=1 must be a bool"):
        ms.Experts(3, 4, 5, bias=1)


def test_empty_experts_get_zero_bias_gradients():
    e = ms.Experts(3, 4, 5, bias=True)
    e(torch.randn(4, 4), [4, 0, 0]).sum().backward()
    assert e.b1.grad[1:].abs().sum() == 0 and e.b2.grad[1:].abs().sum() == 0
    assert e.b2.grad[0].abs().sum() > 0
