"""Activation checkpointing of Transformer blocks with MoE layers.

A checkpointed block keeps only its input during the forward and recomputes its activations in
the backward pass (``torch.utils.checkpoint``, non-reentrant). Two things make MoE blocks
differ from dense ones:

- the recomputation must route exactly as the forward did: the random state is restored (router
  noise, dropout) and so is the routing context (task and token ids for the task, skill and hash
  routers), which the backward pass would otherwise run outside of;
- the recomputed forward must not count a second time what the first one counted: its aux loss,
  routing statistics and balance counts (``ms.is_recomputing``).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from moesaic.context import current_context, recomputation
from moesaic.routing import replay

__all__ = ["checkpointed"]


def checkpointed(fn: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
    """``fn(*args)`` with its activations recomputed in backward instead of stored."""
    if replay._ACTIVE is not None:
        raise RuntimeError(
            "activation checkpointing cannot run under ms.record_routing / ms.replay_routing: "
            "the recomputed forward would route a second time; switch one of them off"
        )
    contexts = functools.partial(_contexts, current_context())
    return checkpoint(fn, *args, use_reentrant=False, context_fn=contexts)


def _contexts(ctx):
    return contextlib.nullcontext(), recomputation(ctx)
