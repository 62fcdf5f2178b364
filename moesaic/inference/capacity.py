"""Changing an MoE model's capacity at inference: V-MoE's adaptive compute (Riquelme et al. 2021,
§4). A model trained with one capacity ratio is evaluated with another, and with Batch
Prioritized Routing (``drop_policy="priority"``) the patches it skips are its least confident
ones; ``processed_fraction`` says how much of the routed work a forward kept.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from moesaic.dispatch import DROP_POLICIES
from moesaic.layer import MoE

__all__ = ["capacity_override", "processed_fraction"]


@contextlib.contextmanager
def capacity_override(
    model: nn.Module, capacity_factor: float | None, drop_policy: str | None = None
) -> Iterator[list[MoE]]:
    """Within the block every MoE layer of ``model`` uses ``capacity_factor`` (None: dropless)
    and, when given, ``drop_policy`` ("position" | "priority"); both are restored after."""
    if capacity_factor is not None and not capacity_factor > 0:
        raise ValueError(f"capacity_factor={capacity_factor!r} must be > 0 (or None: dropless)")
    if drop_policy is not None and drop_policy not in DROP_POLICIES:
        raise ValueError(f"drop_policy={drop_policy!r} must be one of {sorted(DROP_POLICIES)}")
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    saved = [(m.capacity_factor, m.drop_policy) for m in layers]
    try:
        for m in layers:
            m.capacity_factor = capacity_factor
            if drop_policy is not None:
                m.drop_policy = DROP_POLICIES[drop_policy]()
        yield layers
    finally:
        for m, (factor, policy) in zip(layers, saved, strict=True):
            m.capacity_factor, m.drop_policy = factor, policy


def processed_fraction(layers: list[MoE]) -> float:
    """Of the assignments the routers of ``layers`` made in their last forwards, the share the
    experts processed (1 - dropped), pooled over the layers."""
    kept = requested = 0
    for m in layers:
        stats = m.last_stats
        if stats is None:
            raise ValueError("processed_fraction: a layer has not run a forward yet")
        kept += int(stats.tokens_per_expert.sum())
        requested += int(stats.requested_per_expert.sum())
    return kept / requested if requested else 1.0
