"""Recycle the stacked expert-weight gradients between training steps (CPU).

The gradient of a stacked expert weight is one large tensor (E*D*F floats). After
``optimizer.zero_grad()`` frees it, glibc returns such a block to the OS and the next step's
fresh one page-faults on first touch, on CPU the whole gap between a stacked-weight MoE and a
loop over separate ``nn.Linear`` experts (docs/performance.md, "CPU kernel tuning").

A ``GradPool`` keeps a reference to each weight's last gradient (taken by a post-accumulate-grad
hook). In the next backward it hands the same memory out again, but only when nothing else holds
it any more: not ``param.grad`` (so ``zero_grad(set_to_none=False)`` and gradient accumulation
behave as usual), no view, no user reference. The memory stays allocated between steps, as the
CUDA caching allocator would keep it; ``clear()`` drops it.
"""

from __future__ import annotations

import sys
import weakref

import torch

__all__ = ["GradPool"]


class GradPool:
    def __init__(self) -> None:
        self._held: dict[int, torch.Tensor] = {}
        self._watched: weakref.WeakValueDictionary[int, torch.Tensor] = (
            weakref.WeakValueDictionary()
        )

    def watch(self, param: torch.Tensor) -> None:
        """Remember ``param.grad`` after every accumulation into it (idempotent: call it every
        forward, so parameters that were copied or replaced get watched too)."""
        if param.requires_grad and self._watched.get(id(param)) is not param:
            param.register_post_accumulate_grad_hook(self._keep)
            self._watched[id(param)] = param

    def _keep(self, param: torch.Tensor) -> None:
        if param.grad is not None and param.grad.layout == torch.strided:
            self._held[id(param)] = param.grad

    def take(self, param: torch.Tensor) -> torch.Tensor | None:
        """A tensor shaped like ``param`` that nothing else references, or None."""
        g = self._held.get(id(param))
        if g is None or g.shape != param.shape or g.dtype != param.dtype or not _unshared(g):
            return None
        del self._held[id(param)]
        return g

    def clear(self) -> None:
        self._held.clear()

    def __deepcopy__(self, memo: dict) -> GradPool:
        return GradPool()  # a copy's parameters are new tensors: nothing to recycle yet

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()


def _python_refs(t: torch.Tensor) -> int:
    return sys.getrefcount(t)


def _baseline_refs() -> int:
    """Python references to a pooled tensor that only ``take`` holds, measured on this interpreter
    along a call path of the same shape as take -> _unshared -> _python_refs (so nothing about
    how the interpreter counts references is assumed)."""
    held = {0: torch.empty(1)}
    g = held.get(0)
    return _probe(g)


def _probe(g: torch.Tensor) -> int:
    return _python_refs(g)


_BASELINE = _baseline_refs()


def _unshared(g: torch.Tensor) -> bool:
    # Python side: more references than the pool's own path means a user holds a name for it.
    # C++ side: one reference from the Python object (param.grad would add one); a storage count
    # of 2 is this tensor plus the query's temporary (a view would add one).
    try:
        return (
            _python_refs(g) <= _BASELINE
            and g._use_count() == 1
            and torch._C._storage_Use_Count(g.untyped_storage()._cdata) <= 2
        )
    except (AttributeError, RuntimeError):
        return False
