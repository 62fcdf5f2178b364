"""The fault-drill benchmark runs (quick mode: one NaN drill) and prints its table."""

import torch

from benchmarks.faults import main


def test_fault_drills_print_a_markdown_table(capsys, tmp_path):
    threads = torch.get_num_threads()
    try:
        code = main(["--repeats", "1", "--scenarios", "nan-loss", "--work", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert code == 0
    assert "| scenario | survived / total | steps lost (mean, max) |" in out
    assert "| nan-loss | 1 / 1 | 1.0, 1 | 0 |" in out
