"""Packed copies of the expert weights for CPU serving: oneDNN's blocked layout, made once.

oneDNN repacks a weight on every product; forward-only calls (inference mode, no_grad, frozen
weights) can instead read a copy packed once, at the price of a second copy of the expert
weights. The copy is rebuilt whenever a weight changes (new storage, dtype or shape, or an
in-place update such as an optimizer step). ``Experts.pack_for_inference`` makes one.
"""

from __future__ import annotations

import torch

from moesaic.kernels.cpu.gemm import Packed

__all__ = ["PackCache", "pack"]


def pack(w_KN: torch.Tensor, rows_hint: int) -> Packed:
    """``w`` repacked once for products of about ``rows_hint`` rows (other row counts use the
    same copy)."""
    packed = torch.ops.mkldnn._reorder_linear_weight(w_KN.detach().t().contiguous(), rows_hint)
    return Packed(w_KN, packed)


class PackCache:
    """Packed copies of stacked expert weights (E, K, N), one per expert, rebuilt when any weight
    changes. Copies and pickles start empty: the packed tensors are rebuilt on first use."""

    def __init__(self, rows_hint: int) -> None:
        self.rows_hint = rows_hint
        self._key: tuple | None = None
        self._packs: tuple[list[Packed] | None, ...] = ()

    def get(self, *weights: torch.Tensor | None) -> tuple[list[Packed] | None, ...]:
        key = tuple(
            None if w is None else (w.data_ptr(), _version(w), w.dtype, tuple(w.shape))
            for w in weights
        )
        if key != self._key:
            self._packs = tuple(
                None if w is None else [pack(w[e], self.rows_hint) for e in range(w.shape[0])]
                for w in weights
            )
            self._key = key
        return self._packs

    def __deepcopy__(self, memo: dict) -> PackCache:
        return PackCache(self.rows_hint)

    def __getstate__(self) -> dict:
        return {"rows_hint": self.rows_hint}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["rows_hint"])


def _version(w: torch.Tensor) -> int:
    # Inference tensors (made under torch.inference_mode) keep no version counter: an in-place
    # change to one inside inference mode is not seen; a new tensor (new storage) always is.
    return -1 if w.is_inference() else w._version
