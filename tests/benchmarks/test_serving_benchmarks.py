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


def test_int8_kernel_table_has_a_row_per_size_and_kernel(capsys):
    assert bench_int8.main(["--kernel", "--rounds", "1", "--shapes", "64x32"]) == 0
    out = capsys.readouterr().out
    assert "| 64 x 32 | 1 |" in out and "| 64 x 32 | 256 |" in out and "dequantise ms" in out
    assert ("int8pack ms" in out) == int8_kernel_available()


def test_int8_decoding_table_has_float_rule_and_kernel_rows(capsys):
    assert bench_int8.main(["--generated", "16x32", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    for row in ("| float32 |", "| int8 default (dequantise) |", "| only_faster |"):
        assert row in out
    assert "AVX-512" in out and "default int8 kernel" in out
