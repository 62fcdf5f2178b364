"""benchmarks/device_check.py: the layer on a device against the CPU reference; it passes on
CPU and catches a wrong result. Also the benchmarks' --device and --dtype options."""

from __future__ import annotations

import argparse

import pytest
import torch

from benchmarks import device_check
from benchmarks import peers as bench_peers
from moesaic.cli import bench as bench_layer
from moesaic.cli.timing import device_arg


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_every_case_matches_the_reference_on_cpu(dtype, capsys):
    assert device_check.main(["--device", "cpu", "--dtype", dtype]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "| ok |" in line]
    assert len(rows) == len(device_check.CASES) * 2 * 2  # activations x expert paths
    assert "all cases match the reference" in out


def test_a_wrong_result_is_reported(monkeypatch, capsys):
    monkeypatch.setattr(device_check, "CASES", (("topk", 2, None),))
    reference = device_check.reference_moe
    monkeypatch.setattr(device_check, "reference_moe", lambda *a: reference(*a) * 1.001)
    assert device_check.main(["--dtype", "float32"]) == 1
    out = capsys.readouterr().out
    assert out.count("MISMATCH") == 4 and "4 failed cases" in out


def test_a_case_that_raises_is_reported_and_the_others_still_run(monkeypatch, capsys):
    monkeypatch.setattr(device_check, "CASES", (("topk", 1, None),))
    check = device_check.check_case

    def broken_loop(router, k, cf, activation, impl, device, dtype):
        if impl == "torch":
            raise RuntimeError("no kernel image for this device")
        return check(router, k, cf, activation, impl, device, dtype)

    monkeypatch.setattr(device_check, "check_case", broken_loop)
    assert device_check.main(["--dtype", "float32"]) == 1
    out = capsys.readouterr().out
    assert out.count("| ok |") == 2 and out.count("ERROR RuntimeError: no kernel image") == 2
    assert "2 failed cases" in out


def test_device_argument_is_checked():
    assert device_arg("cpu") == torch.device("cpu")
    with pytest.raises(argparse.ArgumentTypeError, match="not a torch device"):
        device_arg("gpu0")
    with pytest.raises(argparse.ArgumentTypeError, match="run on cpu or cuda"):
        device_arg("meta")
    if not torch.cuda.is_available():
        with pytest.raises(argparse.ArgumentTypeError, match="sees no CUDA device"):
            device_arg("cuda")


def test_layer_benchmark_runs_in_bf16(capsys):
    args = "--tokens 64 --d-model 16 --d-ff 32 --experts 2 --top-k 1 --repeats 1"
    assert bench_layer.main([*args.split(), "--dtype", "bfloat16", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "bfloat16, dropless" in out and "| 2 | 1 | moesaic | " in out


def test_a_peer_that_fails_on_the_device_is_named_and_left_out(monkeypatch, capsys):
    build = bench_peers.build

    class Broken(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("no kernel for this device")

    def with_broken_peer(*args, **kwargs):
        impls, skipped = build(*args, **kwargs)
        return [*impls, bench_peers.Impl("broken", "gelu", Broken(), bench_peers._plain)], skipped

    monkeypatch.setattr(bench_peers, "build", with_broken_peer)
    args = "--tokens 64 --experts 4 --top-k 1 --d-model 16 --d-ff 32 --repeats 1 --peers"
    assert bench_peers.main(args.split()) == 0
    out = capsys.readouterr().out
    assert "| broken | " not in out
    assert "skipped broken: failed on cpu/torch.float32 (RuntimeError: no kernel" in out
