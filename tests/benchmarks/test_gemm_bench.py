"""benchmarks/gemm.py runs its parts and prints their tables (speed lives in the report)."""

import pytest
import torch

from benchmarks import gemm as bench_gemm
from moesaic.experts import Experts
from moesaic.experts.reference import reference_ffn
from moesaic.kernels.cpu.capability import cpu_capability
from moesaic.kernels.cpu.gemm import onednn_available


@pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN")
def test_gemm_bench_prints_products_and_workers_tables(capsys, monkeypatch):
    monkeypatch.setattr(bench_gemm, "ROWS", (1, 8))
    monkeypatch.setattr(bench_gemm, "GRID", ((64, 4, 1),))
    monkeypatch.setattr(bench_gemm, "PEERS_GRID", ((64, 4, 2),))
    monkeypatch.setattr(bench_gemm, "SIZES", ((16, 32, 4),))
    monkeypatch.setattr(bench_gemm.sizes, "__defaults__", (64, 2))
    assert bench_gemm.main(["--d-model", "16", "--d-ff", "32", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "| 1 | 8 | " in out and "swapped / oneDNN time" in out  # 1 thread, 8 rows
    assert "| 64 | 4 | 1 | 16 | gelu | " in out and "| 64 | 4 | 1 | 16 | swiglu | " in out
    assert "| 64 | 4 | 2 | 32 | swiglu | " in out and "packed / limit" in out
    assert "| 16 | 32 | 512 | 4 | " in out


def test_gemm_bench_rejects_an_unknown_part(capsys):
    with pytest.raises(SystemExit):
        bench_gemm.main(["matmuls"])
    err = capsys.readouterr().err
    assert "part='matmuls' must be one of products, workers, sizes, packed, weights" in err


def _bf16_part(part: str, capsys) -> str:
    """benchmarks/gemm.py's ``part`` at toy sizes in bf16: its output."""
    argv = [part, "--d-model", "16", "--d-ff", "32", "--repeats", "1", "--dtype", "bfloat16"]
    assert bench_gemm.main(argv) == 0
    out = capsys.readouterr().out
    assert "packed, weights: bfloat16" in out
    return out


@pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN")
def test_gemm_bench_packs_bf16_layers(capsys, monkeypatch):
    monkeypatch.setattr(bench_gemm, "PEERS_GRID", ((64, 4, 1),))
    out = _bf16_part("packed", capsys)
    if cpu_capability().onednn_bf16:
        assert "| 64 | 4 | 1 | 16 | gelu | " in out and "| 64 | 4 | 1 | 16 | swiglu | " in out
    else:  # AVX2-only x86, ARM: the table says why there is nothing to time
        assert "packing bfloat16 weights is not available on this CPU (" in out


@pytest.mark.parametrize("activation,bias", [("gelu", False), ("swiglu", True)])
def test_shared_weights_runs_every_expert_with_expert_0s_weights(activation, bias):
    torch.manual_seed(0)
    experts = Experts(4, 16, 32, activation, bias=bias)
    for p in experts.parameters():  # biases start at zero: make them count
        torch.nn.init.normal_(p, std=0.1)
    shared = bench_gemm.shared_weights(experts)
    # each expert's matrix keeps the experts' transposed layout (oneDNN's operand order)
    assert shared.w1[3].t().is_contiguous() and shared.w2[3].t().is_contiguous()
    x = torch.randn(20, 16)
    counts = [5, 0, 7, 8]
    with torch.inference_mode():
        got, distinct = shared(x, counts), experts(x, counts)
    want = torch.stack([reference_ffn(row, experts, 0) for row in x])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(distinct, got, atol=1e-3)  # the copy, not the experts, shares


@pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN")
def test_gemm_bench_prints_the_weights_table(capsys, monkeypatch):
    monkeypatch.setattr(bench_gemm, "GRID", ((64, 4, 2),))
    out = _bf16_part("weights", capsys)
    assert "distinct - shared ms" in out
    row = next(line for line in out.splitlines() if line.startswith("| 64 | 4 | 2 | 32 | "))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[4] == "0"  # 2 * 4 * 16 * 32 bf16 weights: 0.0078 MiB
    assert all(float(c) > 0 for c in cells[5:8])  # distinct, shared, limit ms
