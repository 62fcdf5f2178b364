"""The CPU capability probe decides every oneDNN path: it agrees with the CPU's instruction-set
flags on x86, and where it says no, every path falls back to torch.mm with the same results."""

from __future__ import annotations

import copy
import dataclasses
import platform

import pytest
import torch

import moesaic as ms
from moesaic.experts.reference import reference_moe
from moesaic.kernels.cpu import capability, gemm
from moesaic.kernels.cpu.capability import cpu_capability
from moesaic.kernels.cpu.tuning import DEFAULT_TUNING, CpuTuning
from tests.cases import capture_routing, expert_backend


def test_the_probe_agrees_with_the_instruction_set_flags():
    cap = cpu_capability()
    assert cap.arch == platform.machine() and cap.isa
    if cap.arch in ("x86_64", "AMD64") and torch.backends.mkldnn.is_available():
        assert cap.onednn_fp32  # every x86 wheel bundles oneDNN, which runs fp32 on AVX2
        flags = set(cap.flags)
        # oneDNN's bf16 linear needs AVX-512 BW, VL and DQ, or AVX-NE-CONVERT
        expected = {"avx512_bw", "avx512_vl", "avx512_dq"} <= flags or "avx_ne_convert" in flags
        assert cap.onednn_bf16 == expected, cap.describe()
    assert "oneDNN fp32" in cap.describe() and cap.name in cap.describe()


def test_a_probe_that_fails_turns_its_path_off(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("could not create a primitive descriptor")

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", broken, raising=False)
    assert not capability._probe(torch.float32)
    assert not capability._probe(torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_without_onednn_every_expert_path_runs_on_torch_mm_and_matches(monkeypatch, dtype):
    off = dataclasses.replace(cpu_capability(), onednn_fp32=False, onednn_bf16=False)
    monkeypatch.setattr(gemm, "cpu_capability", lambda: off)
    assert not gemm.use_onednn(
        CpuTuning(gemm="onednn"), torch.zeros(1, dtype=dtype), DEFAULT_TUNING.min_weight
    )
    assert not gemm.gate_onednn(DEFAULT_TUNING, torch.zeros(4096, 8), torch.float32)
    torch.manual_seed(0)
    layer = ms.MoE(
        16, 32, 4, router="topk", top_k=2, expert_backend=expert_backend(gemm="onednn")
    ).to(dtype)
    x = torch.randn(600, 16, dtype=dtype)
    seen = capture_routing(layer)
    y = layer(x)
    with torch.no_grad():
        want = reference_moe(x.float(), seen[-1], copy.deepcopy(layer.experts).float())
    tol = {"atol": 3e-2, "rtol": 3e-2} if dtype == torch.bfloat16 else {"atol": 1e-5, "rtol": 1e-5}
    torch.testing.assert_close(y.float(), want, **tol)


@pytest.mark.parametrize(
    "isa,vendor,expected",
    [
        ("AVX512", "AMD", True),
        ("AVX512", "Intel", False),  # MKL's own AVX-512 sgemm measured faster there
        ("AVX2", "AMD", False),
        ("AVX2", "Intel", False),
        ("SVE256", "other", False),
    ],
)
def test_auto_takes_onednn_only_on_the_cpus_where_it_measured_faster(
    monkeypatch, isa, vendor, expected
):
    cap = dataclasses.replace(cpu_capability(), isa=isa, vendor=vendor, onednn_fp32=True)
    monkeypatch.setattr(gemm, "cpu_capability", lambda: cap)
    big = torch.zeros(1)
    assert gemm.use_onednn(CpuTuning(gemm="auto"), big, DEFAULT_TUNING.min_weight) == expected
    assert gemm.packable(CpuTuning(gemm="auto"), big, DEFAULT_TUNING.min_weight) == expected
    assert gemm.use_onednn(
        CpuTuning(gemm="onednn"), big, 1
    )  # an explicit request runs wherever oneDNN does


@pytest.mark.parametrize(
    "name,vendor_id,processor,expected",
    [
        ("AMD EPYC 9B14", "vendor_id\t: AuthenticAMD", "", "AMD"),
        ("Intel Xeon", "vendor_id\t: GenuineIntel", "", "Intel"),
        ("unknown CPU", "vendor_id\t: GenuineIntel", "", "Intel"),  # torch without a name
        ("", "", "AMD64 Family 25 Model 17 Stepping 1, AuthenticAMD", "AMD"),  # Windows
        ("", "", "Intel64 Family 6 Model 143 Stepping 8, GenuineIntel", "Intel"),
        ("Neoverse-V1", "", "aarch64", "other"),
    ],
)
def test_the_vendor_is_read_from_the_name_the_kernel_or_the_platform(
    name, vendor_id, processor, expected
):
    assert capability._vendor(name, vendor_id, processor) == expected
    # an ARM process emulated on an x86 host reads the host's vendor_id: still "other"
    assert capability._vendor(name, vendor_id, processor, "aarch64") == "other"
    assert capability._vendor(name, vendor_id, processor, "arm64") == "other"
    assert cpu_capability().vendor in ("AMD", "Intel", "other")
