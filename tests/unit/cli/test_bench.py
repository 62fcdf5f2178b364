"""The benchmark and the command line run (correctness only; speed lives in benchmarks/)."""

import subprocess
import sys

import pytest
import torch

from moesaic.cli.bench import NaiveMoE, main
from moesaic.cli.main import main as cli_main


def test_naive_baseline_computes_a_top_k_mixture():
    torch.manual_seed(0)
    naive = NaiveMoE(4, 8, 3, 2)
    x = torch.randn(5, 4)
    w, e = naive.gate(x).softmax(-1).topk(2, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    want = torch.stack(
        [sum(w[t, j] * naive.experts[int(e[t, j])](x[t]) for j in range(2)) for t in range(5)]
    )
    torch.testing.assert_close(naive(x), want)


def test_bench_prints_a_ratio_table(capsys):
    assert (
        main(
            [
                "--tokens",
                "64",
                "--d-model",
                "16",
                "--d-ff",
                "32",
                "--experts",
                "4",
                "--top-k",
                "1",
                "--repeats",
                "1",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "| 4 | 1 | moesaic |" in out and "| 4 | 1 | dense | " in out and "x dense" in out


def test_bench_rejects_bad_options(capsys):
    with pytest.raises(SystemExit):
        main(["--tokens", "0"])
    assert "--tokens=0 must be >= 1" in capsys.readouterr().err


def test_cli_dispatches_and_reports_its_version(capsys):
    assert cli_main(["--version"]) == 0
    assert "moesaic 0.1.0" in capsys.readouterr().out
    assert cli_main([]) == 2
    with pytest.raises(SystemExit):
        cli_main(["no-such-command"])


def test_python_dash_m_moesaic_runs():
    out = subprocess.run(
        [sys.executable, "-m", "moesaic", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "bench" in out


def test_time_rounds_calls_each_function_once_per_round_in_rotated_order():
    from moesaic.cli.timing import time_rounds

    calls: list[str] = []
    fns = {name: (lambda n=name: calls.append(n)) for name in "abc"}
    rounds = time_rounds(fns, repeats=4, warmup=1)
    assert calls[:3] == ["a", "b", "c"]  # warm-up in order
    assert calls[3:] == list("abcbcacababc")
    assert {k: len(v) for k, v in rounds.items()} == {"a": 4, "b": 4, "c": 4}
    assert all(t >= 0 for v in rounds.values() for t in v)
