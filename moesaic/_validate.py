"""Argument checks shared by the public constructors: one-line errors naming field, value, rule."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from collections.abc import Iterator

import torch

__all__ = [
    "check_positive_int",
    "check_choice",
    "check_dropout",
    "check_nonnegative_float",
    "check_tokens",
    "prefixed_errors",
]


def check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}={value!r} must be an int")
    if value < 1:
        raise ValueError(f"{name}={value} must be >= 1")


def check_nonnegative_float(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}={value!r} must be a float")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name}={value!r} must be a finite float >= 0")


def check_positive_float(name: str, value: object, note: str = "") -> None:
    """A finite float > 0 (``note`` ends the message for zero, e.g. " (or None)")."""
    check_nonnegative_float(name, value)
    if value <= 0:
        raise ValueError(f"{name}={value} must be > 0{note}")


def check_dropout(name: str, value: object) -> None:
    """A dropout probability: a float in [0, 1)."""
    check_nonnegative_float(name, value)
    if value >= 1:
        raise ValueError(f"{name}={value} must be < 1 (a dropout probability)")


def check_choice(name: str, value: object, valid: object) -> None:
    names = sorted(valid)
    if not isinstance(value, str) or value not in names:
        raise ValueError(f"{name}={value!r} is not one of {names}")


def check_tokens(name: str, x: object, d_model: int, like: torch.Tensor) -> None:
    """``x`` must be a floating (T, d_model) tensor on ``like``'s device."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name}.dtype={x.dtype} must be a floating point dtype")
    if x.dim() != 2 or x.shape[1] != d_model:
        raise ValueError(f"{name}.shape={tuple(x.shape)} must be (tokens, d_model={d_model})")
    if x.device != like.device:
        raise ValueError(f"{name}.device={x.device} must match the module's device {like.device}")


@contextlib.contextmanager
def prefixed_errors(path: str, cls: type) -> Iterator[None]:
    """Re-raise a TypeError / ValueError about the dataclass ``cls`` held at ``path`` with the
    path in front: "top_k=9 must be ..." -> "model.moe.top_k=9 must be ..." when the message
    starts with a field of ``cls``, else "model.moe: ..."; a message naming ``path`` already
    stays as it is."""
    try:
        yield
    except (TypeError, ValueError) as err:
        message = str(err)
        if message.startswith((f"{path}.", f"{path}:")):
            raise
        first = re.match(r"\w+", message)
        names = {f.name for f in dataclasses.fields(cls)}
        sep = "." if first and first.group() in names else ": "
        raise type(err)(f"{path}{sep}{message}") from None
