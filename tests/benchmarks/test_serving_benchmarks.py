"""benchmarks/offload.py and benchmarks/int8.py still run (quick sizes)."""

import pytest

from benchmarks import int8 as bench_int8
from benchmarks import offload as bench_offload
from moesaic.inference.quantize import int8_kernel_available


@pytest.mark.parametrize("fraction", [-1.0, 0.25])
def test_one_offload_benchmark_run_reports_speed_memory_and_reads(tmp_path, fraction):
    # one run in this process (main runs each in a fresh one, which is what costs time)
    args = bench_offload.argparse.Namespace(
        d_model=16,
        d_ff=32,
        experts=4,
        layers=2,
        batch=2,
        steps=1,
        fraction=fraction,
        store=str(tmp_path),
    )
    row = bench_offload.run_one(args)
    assert row["tok_s"] > 0 and row["peak_rss"] > 0
    if fraction > 0:  # 25% of 2 layers x 4 experts: two experts' room, reads every step
        assert row["resident_bytes"] <= 2 * 2 * 16 * 32 * 4 and row["reads"] > 0


@pytest.mark.skipif(not int8_kernel_available(), reason="no torch._weight_int8pack_mm")
def test_int8_kernel_table_has_a_row_per_size(capsys):
    assert bench_int8.main(["--kernel", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "| 1 |" in out and "| 64 |" in out
