"""Side-by-side timing for ``moesaic bench`` and the repository's benchmarks/: implementations
interleaved round-robin in one process.

Interleaving means a slow moment of the machine (another process, thermal state) lands on every
implementation alike, so the printed ratios stay meaningful on a noisy shared CPU. Once CUDA is
in use the clock waits for the device before and after every call.
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import time
from collections.abc import Callable

import torch

__all__ = [
    "DTYPES",
    "time_interleaved",
    "time_rounds",
    "environment",
    "device_arg",
    "synchronize",
]


DTYPES = ("float32", "bfloat16")  # the benchmarks' --dtype choices


def synchronize() -> None:
    """Wait for queued CUDA work (nothing to wait for when CUDA was never initialised)."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def time_interleaved(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1
) -> dict[str, float]:
    """Median seconds per call of each function, calls interleaved round-robin."""
    rounds = time_rounds(fns, repeats, warmup)
    return {name: statistics.median(s) for name, s in rounds.items()}


def time_rounds(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds of each call, one per round: every round calls each function once, starting one
    function later than the round before, so that no function always runs right after the same
    neighbour and a slow spell of the machine falls on all of them alike (paired ratios of two
    functions' times in the same round cancel most of it)."""
    names = list(fns)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(repeats):
        shift = r % len(names) if names else 0
        for name in names[shift:] + names[:shift]:
            gc.collect()
            synchronize()
            start = time.perf_counter()
            fns[name]()
            synchronize()
            samples[name].append(time.perf_counter() - start)
    return samples


def environment(device: torch.device | str = "cpu") -> str:
    """One line naming the versions, threads and processor (and GPU) the numbers came from."""
    line = (
        f"torch {torch.__version__}, python {platform.python_version()}, "
        f"{torch.get_num_threads()} threads, {platform.machine()} {platform.processor() or ''}"
    ).strip()
    device = torch.device(device)
    if device.type == "cuda":
        line += f"; {torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}"
    return line


def device_arg(value: str) -> torch.device:
    """``--device`` for the benchmarks: a torch device that exists on this machine."""
    try:
        device = torch.device(value)
    except RuntimeError as err:
        raise argparse.ArgumentTypeError(f"{value!r} is not a torch device ({err})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{value!r}: this torch sees no CUDA device")
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{value!r}: the benchmarks run on cpu or cuda")
    return device
