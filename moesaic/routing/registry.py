"""Router registry: ``ROUTERS`` maps a name to a ``Router`` class."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from moesaic.routing.base import Router

__all__ = ["ROUTERS", "register_router", "build_router"]

ROUTERS: dict[str, type[Router]] = {}

R = TypeVar("R", bound=type[Router])


def register_router(name: str) -> Callable[[R], R]:
    """Class decorator: make a Router subclass constructible as ``ms.MoE(router=name)``."""

    def wrap(cls: R) -> R:
        if name in ROUTERS:
            raise ValueError(f"router name {name!r} is already registered by {ROUTERS[name]}")
        ROUTERS[name] = cls
        cls.registry_name = name
        return cls

    return wrap


def build_router(
    router: str | Router,
    *,
    d_model: int,
    num_experts: int,
    top_k: int | None,
    router_dtype: torch.dtype,
    jitter: float | None,
    capacity_factor: float | None = None,
    options: dict[str, Any] | None = None,
) -> Router:
    """A router instance from a name in ``ROUTERS`` (or the instance itself, checked).

    A router whose constructor takes ``capacity_factor`` (expert choice) receives the layer's,
    unless ``options`` sets its own or the layer is dropless (None).
    """
    if isinstance(router, Router):
        if options:
            raise ValueError("router_options are only used when router is given by name")
        if router.num_experts != num_experts:
            raise ValueError(
                f"router.num_experts={router.num_experts} must equal num_experts={num_experts}"
            )
        if top_k is not None and router.top_k != top_k:
            raise ValueError(f"router.top_k={router.top_k} must equal top_k={top_k}")
        return router
    if not isinstance(router, str):
        raise TypeError(f"router={router!r} must be a name in ms.ROUTERS or a Router instance")
    if router not in ROUTERS:
        raise ValueError(f"router={router!r} is not one of {sorted(ROUTERS)}")
    cls = ROUTERS[router]
    options = dict(options or {})
    takes_cf = "capacity_factor" in inspect.signature(cls.__init__).parameters
    if takes_cf and capacity_factor is not None:
        options.setdefault("capacity_factor", capacity_factor)
    try:
        return cls(
            d_model,
            num_experts,
            top_k,
            router_dtype=router_dtype,
            jitter=jitter,
            **options,
        )
    except TypeError as err:
        if "unexpected keyword argument" in str(err):
            raise TypeError(f"router_options for router={router!r}: {err}") from None
        raise
