"""What the benchmarks share: the package's interleaved timing (``moesaic.cli.timing``, also
behind ``moesaic bench``), activation memory, and the blocked dense FFN limit.

Run as scripts (``python benchmarks/gemm.py``), the benchmarks put the repository root first on
``sys.path`` so that ``benchmarks`` and this checkout's ``moesaic`` import.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

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
