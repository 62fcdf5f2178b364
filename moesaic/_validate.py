"""Argument checks shared by the public constructors: one-line errors naming field, value, rule."""

from __future__ import annotations

import math

__all__ = ["check_positive_int", "check_choice", "check_nonnegative_float"]


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


def check_choice(name: str, value: object, valid: object) -> None:
    names = sorted(valid)
    if not isinstance(value, str) or value not in names:
        raise ValueError(f"{name}={value!r} is not one of {names}")
