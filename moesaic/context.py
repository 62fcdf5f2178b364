"""Routing context: per-call information (task ids, token ids) that reaches nested MoE layers.

A model's ``forward`` rarely has a way to pass task or token ids down to the MoE layers buried
inside it. ``routing_context`` sets them for the duration of a ``with`` block; task, skill and hash
routers read them. Contexts nest: an inner block overrides only the fields it names.

Example::

    with ms.routing_context(task=torch.tensor([0, 2, 1])):   # one task id per batch row
        out = model(batch)
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator

import torch

__all__ = [
    "RoutingContext",
    "routing_context",
    "current_context",
    "is_recomputing",
    "recomputation",
]


@dataclasses.dataclass(frozen=True, kw_only=True)
class RoutingContext:
    """What routers may read besides the hidden states.

    Attributes:
        task: an int (every token) or a LongTensor of shape (B,) (one id per batch row) or (T,)
            (one id per token). Read by the ``task`` and ``skill`` routers.
        token_ids: LongTensor whose numel equals the number of tokens T (any shape, e.g. (B, S)).
            Read by the ``hash`` router.
    """

    task: int | torch.Tensor | None = None
    token_ids: torch.Tensor | None = None


_EMPTY = RoutingContext()
_CURRENT: contextvars.ContextVar[RoutingContext] = contextvars.ContextVar(
    "moesaic_routing_context", default=_EMPTY
)


def current_context() -> RoutingContext:
    """The innermost active ``RoutingContext`` (an empty one outside any ``with`` block)."""
    return _CURRENT.get()


_RECOMPUTING: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "moesaic_recomputing", default=False
)


def is_recomputing() -> bool:
    """True while activation checkpointing recomputes a forward during backward: MoE layers
    then leave their aux-loss sum, routing statistics and balance counts alone, so the step
    counts each of them once."""
    return _RECOMPUTING.get()


@contextlib.contextmanager
def recomputation(ctx: RoutingContext) -> Iterator[None]:
    """Recompute a checkpointed forward as it first ran: under the routing context ``ctx`` it
    had (the backward pass runs outside the caller's ``with`` blocks), flagged as a
    recomputation (``is_recomputing``)."""
    token, flag = _CURRENT.set(ctx), _RECOMPUTING.set(True)
    try:
        yield
    finally:
        _RECOMPUTING.reset(flag)
        _CURRENT.reset(token)


def _check_ids(name: str, value: object) -> None:
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"routing_context({name}=...) must be an int or a LongTensor, "
            f"got {type(value).__name__}"
        )
    if value.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(
            f"routing_context({name}=...) must hold integer ids, got dtype {value.dtype}"
        )


@contextlib.contextmanager
def routing_context(
    *, task: int | torch.Tensor | None = None, token_ids: torch.Tensor | None = None
) -> Iterator[RoutingContext]:
    """Make ``task`` and/or ``token_ids`` visible to every router called inside the block."""
    _check_ids("task", task)
    _check_ids("token_ids", token_ids)
    if token_ids is not None and not isinstance(token_ids, torch.Tensor):
        raise TypeError("routing_context(token_ids=...) must be a LongTensor")
    outer = _CURRENT.get()
    ctx = dataclasses.replace(
        outer,
        **{k: v for k, v in (("task", task), ("token_ids", token_ids)) if v is not None},
    )
    token = _CURRENT.set(ctx)
    try:
        yield ctx
    finally:
        _CURRENT.reset(token)
