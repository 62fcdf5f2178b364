"""``MoEConfig``: every option of an ``ms.MoE`` layer, typed and validated once.

``ms.MoE(config)`` and ``ms.MoE(**fields)`` build the same layer. A model that holds MoE layers
keeps one ``MoEConfig`` and fills in what it owns (``LMConfig`` and ``moefy`` set ``d_model``,
``d_ff`` and ``activation`` from the model with ``inherit``), so no option is copied by hand.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from moesaic._validate import (
    check_choice,
    check_dropout,
    check_nonnegative_float,
    check_positive_float,
    check_positive_int,
)
from moesaic.dispatch import DROP_POLICIES
from moesaic.experts import ACTIVATIONS, ExpertBackend, backend_names
from moesaic.routing import Router, build_router

__all__ = ["MoEConfig", "check_model_moe"]

DEFAULT_ACTIVATION = "gelu"


@dataclasses.dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """Options of one ``ms.MoE`` layer (see ``ms.MoE`` for what each does).

    Args:
        d_model, d_ff: token width D and each expert's hidden width F. None only in a config a
            model fills in (``LMConfig.moe``, ``moefy``); a layer needs both.
        num_experts: E.
        router: a name in ``ms.ROUTERS`` or a ``Router`` instance.
        top_k: experts per token; None takes the router's default (``experts_per_token``).
        capacity_factor: None for dropless, else a float > 0.
        drop_policy: "position" | "priority".
        activation: "gelu" | "gelu_tanh" | "relu" | "silu" | "swiglu"; None: the model's
            activation inside a model, "gelu" for a layer of its own.
        expert_bias, shared_d_ff, shared_gate, residual_coefficient, aux_loss_weight,
        z_loss_weight, jitter, router_dtype, router_options, expert_backend: as in ``ms.MoE``.
            ``router_dtype`` may be given by name ("float32"), as a run config stored in JSON
            has it.
        expert_dropout: dropout on the routed experts' hidden activations, in training only
            (Switch fine-tuning: 0.4 inside experts, 0.1 elsewhere; Fedus et al. 2022, §4.2).

    Every field is checked in ``__post_init__`` (the router is built once on the meta device to
    check ``top_k``, ``jitter``, ``router_dtype`` and ``router_options``); errors name the field,
    the value and the rule.

    Example::

        >>> cfg = ms.MoEConfig(d_model=512, d_ff=2048, num_experts=8, router="topk", top_k=2)
        >>> layer = ms.MoE(cfg)                     # same as ms.MoE(**dataclasses.asdict(cfg))
        >>> wider = dataclasses.replace(cfg, num_experts=16)
    """

    d_model: int | None = None
    d_ff: int | None = None
    num_experts: int
    router: str | Router = "switch"
    top_k: int | None = None
    capacity_factor: float | None = None
    drop_policy: str = "position"
    activation: str | None = None
    expert_bias: bool = False
    shared_d_ff: int = 0
    shared_gate: bool = False
    residual_coefficient: bool = False
    aux_loss_weight: float = 0.01
    z_loss_weight: float = 0.0
    jitter: float | None = None
    router_dtype: torch.dtype = torch.float32
    router_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    expert_backend: str | ExpertBackend = "auto"
    expert_dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("d_model", "d_ff"):
            if getattr(self, name) is not None:
                check_positive_int(name, getattr(self, name))
        check_positive_int("num_experts", self.num_experts)
        if self.capacity_factor is not None:
            check_positive_float("capacity_factor", self.capacity_factor, " (or None)")
        check_choice("drop_policy", self.drop_policy, DROP_POLICIES)
        if self.activation is not None:
            check_choice("activation", self.activation, ACTIVATIONS)
        if not isinstance(self.expert_bias, bool):
            raise TypeError(f"expert_bias={self.expert_bias!r} must be a bool")
        shared = self.shared_d_ff
        if isinstance(shared, bool) or not isinstance(shared, int) or shared < 0:
            raise ValueError(f"shared_d_ff={shared!r} must be an int >= 0")
        if not isinstance(self.shared_gate, bool):
            raise TypeError(f"shared_gate={self.shared_gate!r} must be a bool")
        if self.shared_gate and not shared:
            raise ValueError("shared_gate=True needs shared_d_ff > 0 (it gates the shared expert)")
        if not isinstance(self.residual_coefficient, bool):
            raise TypeError(f"residual_coefficient={self.residual_coefficient!r} must be a bool")
        if self.residual_coefficient and (not shared or self.shared_gate):
            raise ValueError(
                "residual_coefficient=True needs shared_d_ff > 0 and shared_gate=False (it mixes "
                "the MoE and the shared expert instead of gating the latter)"
            )
        check_nonnegative_float("aux_loss_weight", self.aux_loss_weight)
        check_dropout("expert_dropout", self.expert_dropout)
        check_nonnegative_float("z_loss_weight", self.z_loss_weight)
        if not isinstance(self.expert_backend, ExpertBackend):
            check_choice("expert_backend", self.expert_backend, backend_names())
        options = {} if self.router_options is None else self.router_options
        if not isinstance(options, dict):
            raise TypeError(f"router_options={options!r} must be a dict (or None)")
        object.__setattr__(self, "router_options", dict(options))
        object.__setattr__(self, "router_dtype", _dtype(self.router_dtype))
        object.__setattr__(self, "_top_k", self._check_router())

    def _check_router(self) -> int:
        """Build the router once, on the meta device and without touching the global RNG, so
        that every router rule is checked here; returns its top_k."""
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            return self.build_router().top_k

    def build_router(self) -> Router:
        """This config's router (the instance itself when ``router`` is one)."""
        return build_router(
            self.router,
            d_model=self.d_model or 1,  # a config awaiting its model's width checks the rest
            num_experts=self.num_experts,
            top_k=self.top_k,
            router_dtype=self.router_dtype,
            jitter=self.jitter,
            capacity_factor=self.capacity_factor,
            options=self.router_options,
        )

    @property
    def experts_per_token(self) -> int:
        """k: ``top_k``, or the router's default when ``top_k`` is None."""
        return self._top_k

    @property
    def expert_activation(self) -> str:
        """The experts' activation: ``activation``, or "gelu" when it is None."""
        return self.activation or DEFAULT_ACTIVATION

    def inherit(self, source: str, **values: Any) -> MoEConfig:
        """This config with ``values`` (fields the enclosing model owns, e.g. ``d_model``) filled
        in. A field set to a different value is an error naming both: ``source`` is what names
        the model's value ("model." gives "d_ff=128 conflicts with model.d_ff=256")."""
        clash = [n for n, v in values.items() if getattr(self, n) not in (None, v)]
        if clash:
            both = "; ".join(
                f"{n}={getattr(self, n)!r} conflicts with {source}{n}={values[n]!r}" for n in clash
            )
            raise ValueError(f"{both} (leave {', '.join(clash)} None to take the model's)")
        return dataclasses.replace(self, **values)


def check_model_moe(name: str, moe: object) -> None:
    """A model config's MoE section ``name``: None (a dense model) or an ``MoEConfig`` whose
    router is given by name, as a run's config is saved as JSON; errors name ``name``."""
    if moe is None:
        return
    if not isinstance(moe, MoEConfig):
        raise TypeError(f"{name}={moe!r} must be an ms.MoEConfig or None (dense)")
    if not isinstance(moe.router, str):
        raise TypeError(
            f"{name}.router: a {type(moe.router).__name__} instance; it must be a name in "
            "ms.ROUTERS (a run's config is saved as JSON)"
        )


def _dtype(value: object) -> object:
    """A torch.dtype given by name ("float32", "torch.bfloat16") as the dtype; anything else as
    is (the router checks it is a floating dtype)."""
    if isinstance(value, str):
        dtype = getattr(torch, value.removeprefix("torch."), None)
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"router_dtype={value!r} must be a floating torch.dtype")
        return dtype
    return value
