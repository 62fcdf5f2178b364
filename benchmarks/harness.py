"""What the benchmarks share: the package's interleaved timing (``moesaic.cli.timing``, also
behind ``moesaic bench``), activation memory, and the blocked dense FFN limit.

Run as scripts (``python benchmarks/gemm.py``), the benchmarks put the repository root first on
``sys.path`` so that ``benchmarks`` and this checkout's ``moesaic`` import.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from moesaic.cli.bench import DenseFFN
from moesaic.cli.timing import (
    DTYPES,
    device_arg,
    environment,
    synchronize,
    time_interleaved,
    time_rounds,
)

__all__ = [
    "AllToAllMeter",
    "DTYPES",
    "BLOCK",
    "BlockedDense",
    "device_arg",
    "environment",
    "saved_for_backward_bytes",
    "synchronize",
    "time_interleaved",
    "time_rounds",
]

BLOCK = 512  # tokens per block of the blocked dense FFNs


class BlockedDense(DenseFFN):
    """The dense FFN over blocks of ``block`` tokens, so each block's hidden stays in cache."""

    def __init__(self, d_model: int, d_hidden: int, family: str, block: int = BLOCK) -> None:
        super().__init__(d_model, d_hidden, family)
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([super(BlockedDense, self).forward(c) for c in x.split(self.block)])


class AllToAllMeter:
    """Inside ``with AllToAllMeter() as meter:``, every ``dist.all_to_all_single`` call adds the
    bytes it is handed (its input) to ``meter.bytes`` and its seconds to ``meter.seconds``."""

    def __init__(self) -> None:
        self.bytes, self.seconds = 0, 0.0
        self._original = None

    def __enter__(self) -> AllToAllMeter:
        self._original = dist.all_to_all_single
        dist.all_to_all_single = self._call
        return self

    def __exit__(self, *exc: object) -> None:
        dist.all_to_all_single = self._original

    def _call(self, output, input, *args, **kwargs):
        start = time.perf_counter()
        work = self._original(output, input, *args, **kwargs)
        self.seconds += time.perf_counter() - start
        self.bytes += input.numel() * input.element_size()
        return work


def saved_for_backward_bytes(fn: Callable[[], object], exclude: Sequence[torch.Tensor]) -> int:
    """Bytes autograd keeps for backward while running ``fn`` (activation memory), counting each
    storage once and leaving out the storages of ``exclude`` (parameters, the input)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(n for ptr, n in seen.items() if ptr not in skip)
