"""benchmarks/gemm.py runs both parts and prints their tables (speed lives in the report)."""

import pytest

from moesaic.bench import gemm as bench_gemm
from moesaic.experts.gemm import onednn_available


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
    assert "part='matmuls' must be one of products, workers, sizes, packed" in err


@pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN")
def test_gemm_bench_packs_bf16_layers(capsys, monkeypatch):
    monkeypatch.setattr(bench_gemm, "PEERS_GRID", ((64, 4, 1),))
    argv = ["packed", "--d-model", "16", "--d-ff", "32", "--repeats", "1", "--dtype", "bfloat16"]
    assert bench_gemm.main(argv) == 0
    out = capsys.readouterr().out
    assert "packed: bfloat16" in out
    assert "| 64 | 4 | 1 | 16 | gelu | " in out and "| 64 | 4 | 1 | 16 | swiglu | " in out
