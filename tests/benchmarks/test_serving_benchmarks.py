"""benchmarks/offload.py and benchmarks/int8.py still run (quick sizes) and print their tables;
the store the offload benchmark writes is gone afterwards."""

import glob

import pytest

from benchmarks import int8 as bench_int8
from benchmarks import offload as bench_offload
from moesaic.inference.quantize import int8_kernel_available


def test_offload_benchmark_prints_a_row_per_budget_and_leaves_no_store(capsys):
    before = set(glob.glob("/tmp/moesaic-offload-*"))
    args = ["--d-model", "16", "--d-ff", "32", "--experts", "4", "--layers", "2"]
    assert bench_offload.main([*args, "--batch", "2", "--steps", "1"]) == 0
    out = capsys.readouterr().out
    for row in ("| resident (tuned CPU backend) |", "| resident (plain torch loop) |", "| 25% |"):
        assert row in out
    assert set(glob.glob("/tmp/moesaic-offload-*")) == before


@pytest.mark.skipif(not int8_kernel_available(), reason="no torch._weight_int8pack_mm")
def test_int8_kernel_table_has_a_row_per_size(capsys):
    assert bench_int8.main(["--kernel", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "| 1 |" in out and "| 64 |" in out
