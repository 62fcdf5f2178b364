"""Packed expert weights for forward-only calls: same results, rebuilt when weights change."""

import copy
import pickle

import pytest
import torch

import moesaic as ms
from moesaic.experts.reference import reference_ffn
from moesaic.inference import pack_experts, unpack_experts
from moesaic.kernels.cpu import gemm, packing
from moesaic.kernels.cpu.capability import cpu_capability
from tests.cases import expert_backend

pytestmark = pytest.mark.skipif(
    not gemm.onednn_available(), reason="this torch build has no oneDNN (x86 wheels all do)"
)

COUNTS = [9, 0, 3, 17, 12]


def _reference(x, experts, counts):
    owner = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts)).tolist()
    return torch.stack([reference_ffn(x[a], experts, e) for a, e in enumerate(owner)])


@pytest.mark.parametrize("impl", ["loop", "threads"])
@pytest.mark.parametrize("activation", ["gelu", "relu", "swiglu"])
def test_packed_forward_equals_the_reference(activation, impl):
    torch.manual_seed(0)
    experts = ms.Experts(5, 16, 24, activation, bias=True, backend=expert_backend(impl, "onednn"))
    experts.pack_for_inference(8)
    x = torch.randn(sum(COUNTS), 16)
    with torch.inference_mode():
        got = experts(x, COUNTS)
    torch.testing.assert_close(got, _reference(x, experts, COUNTS))
    with torch.no_grad():
        torch.testing.assert_close(experts(x, COUNTS), got)


def test_the_packed_copy_follows_weight_updates():
    torch.manual_seed(0)
    experts = ms.Experts(
        5, 16, 24, "swiglu", backend=expert_backend(gemm="onednn")
    ).pack_for_inference()
    x = torch.randn(sum(COUNTS), 16)
    opt = torch.optim.SGD(experts.parameters(), lr=0.5)
    experts(x, COUNTS).square().sum().backward()  # a training call ignores the packed copy
    opt.step()
    with torch.inference_mode():
        got = experts(x, COUNTS)
    torch.testing.assert_close(got, _reference(x, experts, COUNTS))
    experts.load_state_dict(
        ms.Experts(5, 16, 24, "swiglu", backend=expert_backend(gemm="onednn")).state_dict()
    )
    with torch.inference_mode():
        torch.testing.assert_close(experts(x, COUNTS), _reference(x, experts, COUNTS))


def test_training_gradients_do_not_depend_on_packing():
    torch.manual_seed(0)
    plain = ms.Experts(5, 16, 24, "gelu", bias=True, backend=expert_backend(gemm="onednn"))
    packed = copy.deepcopy(plain).pack_for_inference()
    x = torch.randn(sum(COUNTS), 16)
    for m in (plain, packed):
        m(x, COUNTS).square().sum().backward()
    for p, q in zip(plain.parameters(), packed.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def test_copies_pickles_and_state_dicts_ignore_the_packed_copy():
    torch.manual_seed(0)
    layer = ms.MoE(16, 24, 4, router="topk", top_k=2, expert_backend=expert_backend(gemm="onednn"))
    keys = set(layer.state_dict())
    layer.experts.pack_for_inference()
    assert set(layer.state_dict()) == keys
    x = torch.randn(20, 16)
    with torch.inference_mode():
        want = layer(x)
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert clone.experts.packs is not None
        with torch.inference_mode():
            torch.testing.assert_close(clone(x), want)
    with torch.inference_mode():  # parameters made in inference mode have no version counter
        torch.testing.assert_close(copy.deepcopy(layer)(x), want)


def test_model_helpers_pack_and_unpack_every_expert_module():
    model = torch.nn.Sequential(
        ms.MoE(
            16, 24, 4, router="topk", shared_d_ff=8, expert_backend=expert_backend(gemm="onednn")
        ),
        ms.MoE(16, 24, 4, router="switch", expert_backend=expert_backend(gemm="onednn")),
        ms.MoE(16, 24, 4, router="switch"),  # small experts under "auto": torch.mm, not packed
    )
    assert pack_experts(model) == 3  # two routed Experts and one shared
    packed = [m.packs is not None for m in model.modules() if isinstance(m, ms.Experts)]
    assert packed == [True, True, True, False]
    assert unpack_experts(model) == 3 and unpack_experts(model) == 0


def test_bad_packing_requests_are_rejected():
    with pytest.raises(ValueError, match="rows_hint"):
        ms.Experts(2, 4, 8).pack_for_inference(0)
    with pytest.raises(ValueError, match="fp32 or bf16 weights on CPU"):
        ms.Experts(2, 4, 8, dtype=torch.float16).pack_for_inference()
    with pytest.raises(ValueError, match="fp32 or bf16 weights on CPU"):
        ms.Experts(
            2, 4, 8, dtype=torch.float64, backend=expert_backend(gemm="onednn")
        ).pack_for_inference()
    with pytest.raises(ValueError, match="run on torch.mm"):
        ms.Experts(2, 4, 8).pack_for_inference()  # too small for oneDNN under "auto"
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got str"):
        pack_experts("model")
    with pytest.raises(TypeError, match="got NoneType"):
        unpack_experts(None)
    with pytest.raises(ValueError, match="rows_hint=0 must be >= 1"):
        pack_experts(torch.nn.Linear(2, 2), rows_hint=0)  # checked even with nothing to pack


def _count_pack_uses(monkeypatch) -> list[torch.dtype]:
    used: list[torch.dtype] = []
    get = packing.PackCache.get

    def spy(self, *weights):
        used.append(weights[0].dtype)
        return get(self, *weights)

    monkeypatch.setattr(packing.PackCache, "get", spy)
    return used


def test_bf16_packing_where_the_cpu_cannot_run_it_says_so_and_pack_experts_skips_it():
    layer = ms.MoE(16, 24, 4, expert_backend=expert_backend(gemm="onednn")).to(torch.bfloat16)
    if cpu_capability().onednn_bf16:
        assert pack_experts(layer) == 1
    else:
        with pytest.raises(ValueError, match="oneDNN cannot run torch.bfloat16 products on this"):
            layer.experts.pack_for_inference()
        assert pack_experts(layer) == 0 and layer.experts.packs is None
        x = torch.randn(10, 16, dtype=torch.bfloat16)
        with torch.inference_mode():  # the unpacked layer still runs (on torch.mm)
            assert layer(x).dtype == torch.bfloat16


needs_bf16 = pytest.mark.skipif(
    not cpu_capability().onednn_bf16,
    reason="oneDNN bf16 needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT; the test above covers the rest",
)


@needs_bf16
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_bf16_packed_forward_equals_the_reference(activation, monkeypatch):
    torch.manual_seed(0)
    experts = ms.Experts(
        5,
        16,
        24,
        activation,
        bias=True,
        backend=expert_backend(gemm="onednn"),
        dtype=torch.bfloat16,
    )
    experts.pack_for_inference(8)
    used = _count_pack_uses(monkeypatch)
    x = torch.randn(sum(COUNTS), 16, dtype=torch.bfloat16)
    with torch.inference_mode():
        got = experts(x, COUNTS)
    assert used == [torch.bfloat16]
    assert got.dtype == torch.bfloat16
    want = _reference(x.float(), copy.deepcopy(experts).float(), COUNTS)
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)


@needs_bf16
def test_bf16_packing_under_auto_follows_the_size_rule():
    big = ms.Experts(2, 512, 512, dtype=torch.bfloat16)  # D*F = 262144 = DEFAULT_TUNING.min_weight
    assert big.pack_for_inference().packs is not None
    with pytest.raises(ValueError, match="run on torch.mm"):
        ms.Experts(2, 64, 256, dtype=torch.bfloat16).pack_for_inference()
    with pytest.raises(ValueError, match="run on torch.mm"):
        ms.Experts(
            2, 512, 512, dtype=torch.bfloat16, backend=expert_backend(gemm="torch")
        ).pack_for_inference()


def test_autocast_calls_do_not_use_the_packed_copy(monkeypatch):
    """Under autocast the weights are cast on every call: a packed copy of them would be
    rebuilt every time, so the products run as without packing."""
    torch.manual_seed(0)
    plain = ms.Experts(5, 16, 24, "gelu", backend=expert_backend(gemm="onednn"))
    packed = copy.deepcopy(plain).pack_for_inference()
    used = _count_pack_uses(monkeypatch)
    x = torch.randn(sum(COUNTS), 16)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = packed(x, COUNTS), plain(x, COUNTS)
    assert used == []
    torch.testing.assert_close(got, want, rtol=0, atol=0)
