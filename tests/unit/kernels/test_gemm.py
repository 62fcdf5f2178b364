"""The experts' products on oneDNN equal the per-token reference, forward and backward."""

import pytest
import torch

import moesaic as ms
from moesaic.experts.reference import reference_ffn
from moesaic.kernels.cpu import gemm
from moesaic.kernels.cpu.capability import cpu_capability
from moesaic.kernels.cpu.tuning import DEFAULT_TUNING, CpuTuning
from tests.cases import expert_backend

needs_onednn = pytest.mark.skipif(
    not gemm.onednn_available(), reason="this torch build has no oneDNN (x86 wheels all do)"
)

# experts with 0 rows, fewer than MIN_ROWS (torch.mm) and more (oneDNN) in one call
COUNTS = [9, 0, 3, 17]


def _owner(counts: list[int]) -> list[int]:
    return torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts)).tolist()


def _reference(x: torch.Tensor, experts: ms.Experts, counts: list[int]) -> torch.Tensor:
    return torch.stack([reference_ffn(x[a], experts, e) for a, e in enumerate(_owner(counts))])


@needs_onednn
@pytest.mark.parametrize("impl", ["loop", "threads"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu", "silu", "swiglu"])
def test_onednn_experts_equal_the_per_token_reference(activation, bias, impl):
    torch.manual_seed(0)
    experts = ms.Experts(4, 16, 24, activation, bias=bias, backend=expert_backend(impl, "onednn"))
    x = torch.randn(sum(COUNTS), 16, requires_grad=True)
    y = experts(x, COUNTS)
    ref = _reference(x, experts, COUNTS)
    torch.testing.assert_close(y, ref)
    with torch.inference_mode():  # the fused forward (activation and gate inside the product)
        torch.testing.assert_close(experts(x.detach(), COUNTS), ref.detach())
    g = torch.randn_like(y)
    params = [x, *experts.parameters()]
    got = torch.autograd.grad((y * g).sum(), params)
    want = torch.autograd.grad((ref * g).sum(), params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@needs_onednn
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_onednn_experts_in_bf16_stay_within_the_stated_tolerance(activation):
    # bf16 experts against the fp32 reference on the same bf16-rounded weights and input
    torch.manual_seed(0)
    experts = ms.Experts(4, 32, 64, activation, bias=True, backend=expert_backend(gemm="onednn"))
    x = torch.randn(sum(COUNTS), 32)
    want = _reference(x.bfloat16().float(), experts.bfloat16().float(), COUNTS)
    experts = experts.bfloat16()
    xb = x.bfloat16().requires_grad_()
    y = experts(xb, COUNTS)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), want, atol=2e-2, rtol=2e-2)
    y.float().sum().backward()
    assert xb.grad is not None and torch.isfinite(experts.w1.grad.float()).all()


@needs_onednn
def test_onednn_and_torch_products_agree_on_a_large_layer():
    torch.manual_seed(0)
    fast = ms.MoE(64, 128, 8, router="topk", top_k=2, expert_backend=expert_backend(gemm="onednn"))
    slow = ms.MoE(64, 128, 8, router="topk", top_k=2, expert_backend=expert_backend(gemm="torch"))
    slow.load_state_dict(fast.state_dict())
    x = torch.randn(512, 64)
    a, b = fast(x), slow(x)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    a.square().sum().backward()
    b.square().sum().backward()
    for p, q in zip(fast.parameters(), slow.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-4)


@needs_onednn
@pytest.mark.parametrize("act", ["none", "gelu", "gelu_tanh", "relu", "silu"])
def test_matmul_on_transposed_views_into_a_slice_equals_torch(act):
    # the backward's weight gradients multiply transposed views: x.t() @ g
    torch.manual_seed(0)
    bias = torch.randn(30)
    for a, b in (
        (torch.randn(40, 24).t(), torch.randn(40, 30)),  # (24, 40) view, (40, 30) contiguous
        (torch.randn(24, 40), torch.randn(30, 40).t()),  # contiguous, (40, 30) view
    ):
        out = torch.zeros(50, 30)
        gemm.matmul(a, b, bias, act=act, onednn=DEFAULT_TUNING, out=out[10:34])
        want = a @ b + bias
        want = want if act == "none" else gemm.ACT[act](want)
        torch.testing.assert_close(out[10:34], want)
        assert out[:10].abs().sum() == 0 and out[34:].abs().sum() == 0


@needs_onednn
def test_gate_and_add_products_equal_torch():
    torch.manual_seed(0)
    a, b, other = torch.randn(12, 20), torch.randn(20, 16), torch.randn(12, 16)
    bias = torch.randn(16)
    torch.testing.assert_close(
        gemm.matmul_mul(a, b, bias, other, onednn=DEFAULT_TUNING), (a @ b + bias) * other
    )
    torch.testing.assert_close(gemm.matmul_add(a, b, other, onednn=DEFAULT_TUNING), a @ b + other)


def test_backend_choice():
    cpu = torch.zeros(1)
    big, small = DEFAULT_TUNING.min_weight, DEFAULT_TUNING.min_weight - 1
    assert not gemm.use_onednn(CpuTuning(gemm="torch"), cpu, big)
    assert not gemm.use_onednn(CpuTuning(gemm="auto"), torch.zeros(1, device="meta"), big)
    assert not gemm.use_onednn(CpuTuning(gemm="auto"), torch.zeros(1, dtype=torch.float64), big)
    # "auto" takes oneDNN where it was measured faster: AVX-512 AMD CPUs (not Intel's, whose
    # MKL runs AVX-512 itself; not AVX2-only, not ARM)
    cap = cpu_capability()
    fast_isa = (
        cap.isa in DEFAULT_TUNING.auto_onednn_isas
        and cap.vendor in DEFAULT_TUNING.auto_onednn_vendors
    )
    assert gemm.use_onednn(CpuTuning(gemm="auto"), cpu, big) == (
        gemm.onednn_available() and fast_isa
    )
    assert not gemm.use_onednn(CpuTuning(gemm="auto"), cpu, small)  # small experts stay on torch.mm
    assert gemm.use_onednn(CpuTuning(gemm="onednn"), cpu, small) == gemm.onednn_available()
    assert not gemm.use_onednn(CpuTuning(gemm="auto"), cpu.bfloat16(), big)
    # bf16 on oneDNN where the CPU runs it (AVX-512 BW/VL/DQ, AVX-NE-CONVERT), else torch.mm
    bf16 = cpu_capability().onednn_bf16
    assert gemm.use_onednn(CpuTuning(gemm="onednn"), cpu.bfloat16(), small) == bf16
    assert gemm.onednn_available(torch.bfloat16) == bf16
    assert gemm.onednn_available() == cpu_capability().onednn_fp32
    with pytest.raises(ValueError, match="gemm"):
        ms.Experts(2, 4, 8, backend=expert_backend(gemm="mkl"))


def test_torch_backend_matches_the_reference_too():
    torch.manual_seed(0)
    experts = ms.Experts(4, 16, 24, "swiglu", bias=True, backend=expert_backend(gemm="torch"))
    x = torch.randn(sum(COUNTS), 16)
    torch.testing.assert_close(experts(x, COUNTS), _reference(x, experts, COUNTS))
