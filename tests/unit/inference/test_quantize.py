"""int8 weight-only experts: the kernel computes what the dequantised weights compute, and the
model stays within a stated tolerance of its float self."""

import copy

import pytest
import torch

import moesaic as ms
from moesaic.experts import Experts
from moesaic.inference import quantize
from moesaic.inference.quantize import QuantizedExperts, int8_kernel_available, quantize_rows

needs_kernel = pytest.mark.skipif(
    not int8_kernel_available(), reason="this torch has no CPU torch._weight_int8pack_mm"
)


def _layer(activation="gelu", bias=False):
    return ms.MoE(
        d_model=32,
        d_ff=64,
        num_experts=4,
        top_k=2,
        router="topk",
        activation=activation,
        expert_bias=bias,
        expert_backend="torch",
    ).eval()


def _dequantised(q: QuantizedExperts, like: Experts) -> Experts:
    """The float Experts holding exactly the weights the int8 ones stand for."""
    ref = copy.deepcopy(like)
    with torch.no_grad():
        for i in ("1", "2", "3"):
            w = getattr(ref, f"w{i}")
            if w is not None:
                qi, si = getattr(q, f"q{i}"), getattr(q, f"s{i}")
                w.copy_((qi.float() * si[..., None]).transpose(1, 2))
    return ref


def test_quantize_rows_rounds_each_row_to_its_own_scale():
    w = torch.tensor([[1.0, -0.5, 0.25], [254.0, 127.0, -1.0]])
    q, s = quantize_rows(w)
    # row 0: scale 1/127, q = round(127 * w); row 1: scale 2, q = round(w / 2) (1/2 rounds to 0)
    torch.testing.assert_close(s, torch.tensor([1 / 127, 2.0]))
    assert q.tolist() == [[127, -64, 32], [127, 64, 0]]


@pytest.mark.parametrize("kernel", [pytest.param(True, marks=needs_kernel), False])
@pytest.mark.parametrize("kw", [{}, {"activation": "swiglu", "bias": True}], ids=str)
def test_int8_experts_equal_the_float_experts_of_their_dequantised_weights(kernel, kw):
    layer = _layer(**kw)
    x_AD, counts = torch.randn(9, 32), [4, 0, 2, 3]
    float_experts = layer.experts
    quantize(layer, kernel=kernel)
    q = layer.experts
    assert isinstance(q, QuantizedExperts) and q.q1.dtype == torch.int8
    want = _dequantised(q, float_experts)(x_AD, counts)
    torch.testing.assert_close(q(x_AD, counts), want, rtol=1e-5, atol=1e-5)


def test_int8_model_stays_within_the_stated_tolerance_of_the_float_model():
    model = ms.models.create("lm-moe-test").eval()
    idx = torch.randint(0, 256, (4, 24))
    with torch.no_grad():
        want = model(idx)
        assert quantize(model) == 1
        got = model(idx)
    # Stated tolerance: int8 per-channel rounding moves each weight by <= scale / 2 (about 0.4%
    # of the row's largest); through the model the logits move by < 1% of their spread.
    assert (got - want).abs().max() < 0.01 * (want.max() - want.min())
    assert got.argmax(-1).eq(want.argmax(-1)).float().mean() > 0.95


def test_int8_experts_hold_a_quarter_of_the_float_bytes_plus_scales():
    layer = _layer()
    float_bytes = sum(p.numel() * 4 for p in layer.experts.parameters())
    quantize(layer)
    E, D, F = 4, 32, 64
    assert layer.experts.nbytes() == float_bytes // 4 + 4 * E * (F + D)


def test_quantize_refuses_a_model_without_experts_or_quantised_twice():
    with pytest.raises(ValueError, match="no MoE layers"):
        quantize(torch.nn.Linear(2, 2))
    layer = _layer()
    quantize(layer)
    with pytest.raises(ValueError, match="not float Experts: quantise before offloading"):
        quantize(layer)
