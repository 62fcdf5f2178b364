"""int8 experts: each kernel's product stays within its stated error bound of the fp32 product,
the weight-only kernels compute what the dequantised weights compute, the default kernel follows
the capability rule, and the model stays within a stated tolerance of its float self."""

import copy
import platform

import pytest
import torch

import moesaic as ms
from moesaic.experts import Experts
from moesaic.inference import quantize
from moesaic.inference.int8 import (
    DYNAMIC_MIN_WEIGHTS,
    Dequantise,
    DynamicQuant,
    choose_kernel,
    has_vnni,
)
from moesaic.inference.quantize import (
    QuantizedExperts,
    engine_kernel,
    int8_kernel,
    int8_kernel_available,
    named_kernel,
    quantize_rows,
)

needs_int8pack = pytest.mark.skipif(
    not int8_kernel_available(), reason="this torch has no CPU torch._weight_int8pack_mm"
)
needs_dynamic = pytest.mark.skipif(
    engine_kernel().name != "dynamic",
    reason=f"this CPU's int8 kernel: {engine_kernel().describe()}",
)
KERNELS = [
    pytest.param("dynamic", marks=needs_dynamic),
    pytest.param("int8pack", marks=needs_int8pack),
    "dequantise",
]


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


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("m", [1, 7, 64])
def test_each_kernels_product_is_within_its_error_bound_of_the_fp32_product(kernel, m):
    gen = torch.Generator().manual_seed(m)
    w_NK, b_N = torch.randn(96, 160, generator=gen), torch.randn(96, generator=gen)
    x_MK = torch.randn(m, 160, generator=gen) * 3 + 1
    k = named_kernel(kernel)
    q_NK, s_N = quantize_rows(w_NK)
    got = k.linear(x_MK, k.pack(q_NK, s_N, b_N))
    want = x_MK.double() @ w_NK.double().T + b_N.double()  # the plain fp32 layer, in fp64
    # Stated bound, per output (n): weight rounding moves w[n, k] by <= s[n] / 2, so y by
    # <= s[n] / 2 * sum_k |x[k]|; the dynamic kernel also rounds x to a uint8 grid of step
    # s_x = range(x, 0) / levels (255, or 127 with reduce_range), at most one step with the
    # clamp at the range's ends, moving y by <= s_x * sum_k |w_hat[n, k]|; plus fp32 rounding.
    # (A worst case: the errors measured reach about a tenth of it, as rounding errors cancel.)
    bound = s_N.double() / 2 * x_MK.abs().double().sum(1, keepdim=True)
    if kernel == "dynamic":
        levels = 127 if k.reduce_range else 255
        s_x = (x_MK.max().clamp(min=0) - x_MK.min().clamp(max=0)).double() / levels
        bound = bound + s_x * (q_NK.double() * s_N.double()[:, None]).abs().sum(1)
    assert ((got.double() - want).abs() <= bound + 1e-4 * want.abs().max()).all()


@pytest.mark.parametrize("kernel", [pytest.param("int8pack", marks=needs_int8pack), "dequantise"])
@pytest.mark.parametrize("kw", [{}, {"activation": "swiglu", "bias": True}], ids=str)
def test_weight_only_experts_equal_the_float_experts_of_their_dequantised_weights(kernel, kw):
    layer = _layer(**kw)
    x_AD, counts = torch.randn(9, 32), [4, 0, 2, 3]
    float_experts = layer.experts
    quantize(layer, kernel=kernel)
    q = layer.experts
    assert isinstance(q, QuantizedExperts) and q.q1.dtype == torch.int8
    want = _dequantised(q, float_experts)(x_AD, counts)
    torch.testing.assert_close(q(x_AD, counts), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("kw", [{}, {"activation": "swiglu", "bias": True}], ids=str)
def test_int8_experts_stay_within_the_stated_tolerance_of_the_float_experts(kernel, kw):
    layer = _layer(**kw)
    x_AD, counts = torch.randn(40, 32), [17, 0, 3, 20]
    with torch.no_grad():
        want = layer.experts(x_AD, counts)  # the float experts, plain "torch" loop
    quantize(layer, kernel=kernel)
    got = layer.experts(x_AD, counts)
    # Stated tolerance: weights and (dynamic) activations rounded to 8 bits move each expert's
    # output by < 5% of the outputs' largest magnitude (measured 0.5-0.7% weight-only, 0.8%
    # gelu and 2.3% swiglu with 8-bit activations, whose product of two rounded halves doubles it).
    assert (got - want).abs().max() < 0.05 * want.abs().max()


def test_default_kernel_follows_the_capability_rule():
    get = getattr(torch.cpu, "get_capabilities", None)  # torch < 2.13 builds may lack it
    caps = get() if get is not None else {}
    rule = choose_kernel(
        platform.machine(),
        torch.backends.cpu.get_cpu_capability(),
        torch.backends.quantized.supported_engines,
        caps,
        lambda k: True,
    )
    chosen = engine_kernel()
    if rule.name == "dynamic":  # the probe may still turn a broken engine off
        assert chosen == rule or (isinstance(chosen, Dequantise) and "probe" in chosen.why)
    else:
        assert chosen == rule
    # by size: the engine's kernel from DYNAMIC_MIN_WEIGHTS per matrix up, else the reference
    assert int8_kernel(DYNAMIC_MIN_WEIGHTS) == chosen == int8_kernel()
    small = int8_kernel(DYNAMIC_MIN_WEIGHTS - 1)
    assert small == chosen if chosen.name != "dynamic" else isinstance(small, Dequantise)


def test_only_faster_keeps_fp32_where_the_rule_says_int8_loses():
    small = _layer()  # 32 x 64 experts: below DYNAMIC_MIN_WEIGHTS
    assert quantize(small, only_faster=True) == 0 and isinstance(small.experts, Experts)
    big = ms.MoE(d_model=512, d_ff=512, num_experts=2, router="topk", expert_backend="torch")
    dynamic = engine_kernel().name == "dynamic"
    assert quantize(big, only_faster=True) == int(dynamic)
    assert isinstance(big.experts, QuantizedExperts if dynamic else Experts)


@pytest.mark.parametrize(
    ("arch", "isa", "engines", "flags", "want"),
    [
        ("x86_64", "AVX2", ["qnnpack", "x86", "fbgemm"], {}, ("dynamic", True)),
        ("x86_64", "AVX512", ["x86"], {"avx512_vnni": True}, ("dynamic", False)),
        ("x86_64", "AVX2", ["fbgemm"], {"avx_vnni": True}, ("dynamic", False)),
        ("x86_64", "DEFAULT", ["x86", "fbgemm"], {}, ("dequantise", None)),
        ("x86_64", "AVX2", ["qnnpack", "onednn"], {}, ("dequantise", None)),
        ("aarch64", "SVE256", ["qnnpack", "onednn"], {}, ("dequantise", None)),
    ],
)
def test_the_rule_on_other_cpus(arch, isa, engines, flags, want):
    k = choose_kernel(arch, isa, engines, flags, lambda k: True)
    assert (k.name, getattr(k, "reduce_range", None)) == want
    assert has_vnni(flags) == (want[1] is False)
    failed = choose_kernel(arch, isa, engines, flags, lambda k: False)
    assert failed.name == "dequantise"


def test_the_default_kernel_is_named_in_the_experts_repr():
    layer = _layer()
    quantize(layer)
    assert int8_kernel(32 * 64).describe() in repr(layer.experts)
    assert isinstance(layer.experts.kernel, (DynamicQuant, Dequantise))


def test_int8_state_dict_round_trips_into_a_fresh_quantised_layer():
    a, b = _layer(activation="swiglu", bias=True), _layer(activation="swiglu", bias=True)
    quantize(a)
    quantize(b)
    b.load_state_dict(a.state_dict())  # repacks b's kernel weights from a's int8 buffers
    x_AD, counts = torch.randn(9, 32), [4, 0, 2, 3]
    torch.testing.assert_close(b.experts(x_AD, counts), a.experts(x_AD, counts))


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
    with pytest.raises(ValueError, match="kernel='fast' must be None or one of"):
        quantize(_layer(), kernel="fast")
    with pytest.raises(ValueError, match="no MoE layers"):
        quantize(torch.nn.Linear(2, 2))
    layer = _layer()
    quantize(layer)
    with pytest.raises(ValueError, match="not float Experts: quantise before offloading"):
        quantize(layer)
