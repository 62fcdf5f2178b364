"""Pack every expert FFN of a model for serving (see ``Experts.pack_for_inference``)."""

from __future__ import annotations

from torch import nn

from moesaic._validate import check_positive_int
from moesaic.experts import Experts

__all__ = ["pack_experts", "unpack_experts"]


def pack_experts(model: nn.Module, rows_hint: int = 64) -> int:
    """Keep a packed copy of the weights of every ``Experts`` in ``model`` whose backend would
    use one in forward-only calls (the CPU backend, where its oneDNN products apply: less
    forward time, docs/performance.md), at the price of a second copy of their weights. The
    others (small experts under the default tuning, other devices and dtypes, the "torch"
    backend) are left alone. Returns how many ``Experts`` modules were packed."""
    _check_model(model)
    check_positive_int("rows_hint", rows_hint)
    experts = [m for m in model.modules() if isinstance(m, Experts) and m.can_pack()]
    for m in experts:
        m.pack_for_inference(rows_hint)
    return len(experts)


def unpack_experts(model: nn.Module) -> int:
    """Drop the copies made by ``pack_experts``; returns how many ``Experts`` modules had one."""
    _check_model(model)
    packed = [m for m in model.modules() if isinstance(m, Experts) and m.packs is not None]
    for m in packed:
        m.unpack()
    return len(packed)


def _check_model(model: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
