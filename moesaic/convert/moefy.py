"""``moefy``: turn the dense FFNs of any model into MoE layers in place (sparse upcycling).

Sparse upcycling (Komatsuzaki et al. 2022, "Sparse Upcycling: Training Mixture-of-Experts from
Dense Checkpoints"): every expert starts as a copy of the dense FFN it replaces, so for a router
whose kept weights sum to one per token (``topk`` with ``normalize=True``, ``hash``, ...) the
converted model computes exactly what the dense model did, and training continues from there.
Switch's top-1 weight is the raw probability p < 1, so a switch-routed upcycled FFN starts as
``p * FFN(x)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from moesaic._validate import check_nonnegative_float, check_positive_int
from moesaic.config import MoEConfig
from moesaic.convert.patterns import PATTERNS, Conversion, recognise
from moesaic.convert.spec import FFNSpec, MoEFFN
from moesaic.layer import MoE
from moesaic.routing import ROUTERS

__all__ = ["moefy", "find_ffns", "upcycled_moe"]

Match = Callable[[str, nn.Module], "FFNSpec | bool | None"]


def moefy(
    model: nn.Module,
    num_experts: int | None = None,
    router: str | None = None,
    every: int = 2,
    upcycle: bool = True,
    match: Match | None = None,
    *,
    config: MoEConfig | None = None,
    noise: float = 0.0,
    seed: int | None = None,
    **moe_options: Any,
) -> nn.Module:
    """Replace every ``every``-th dense FFN of ``model`` with an ``ms.MoE``, in place.

    Args:
        model: any module containing FFNs moefy recognises (``ms.convert.PATTERNS``: moesaic's
            DenseFFN, ``nn.Sequential(Linear, act, Linear)``, GPT-2 ``c_fc``/``c_proj``, LLaMA
            ``gate_proj``/``up_proj``/``down_proj``, BERT ``intermediate``/``output``, timm
            ``Mlp``).
        num_experts: E experts per converted FFN, each as wide as the dense FFN (default 8).
        router: a name in ``ms.ROUTERS`` (default "switch").
        every: FFN i (0-based, in module order) is converted when ``(i + 1) % every == 0``
            (every=2: the 2nd, 4th, ... FFN, as GShard and Switch do; every=1: all).
        upcycle: start every expert as a copy of the dense FFN; False gives fresh experts.
        match: ``match(name, module)`` chooses what to convert instead of the built-in search:
            return an ``FFNSpec`` (your adapter: weights and activation of a dense FFN, replaced
            by ``MoEFFN``, same call ``forward(x)``), True to convert ``module`` with the
            built-in patterns, or None / False to leave it.
        noise: with ``upcycle``, add ``noise * std(W) * N(0, 1)`` to each expert's copy of W so
            experts can diverge; 0 keeps exact copies.
        seed: seeds the noise (None: torch's global RNG). Routers initialise from the global
            RNG, as ``ms.MoE`` does.
        **moe_options: further ``ms.MoEConfig`` fields (``top_k``, ``capacity_factor``,
            ``aux_loss_weight``, ``router_options``, ...).
        config: instead of ``num_experts``, ``router`` and ``moe_options``, the ``ms.MoEConfig``
            of every converted FFN. Either way moefy builds one config and fills in each FFN's
            ``d_model``, ``d_ff`` and ``activation`` (which must be None there or agree) and
            ``expert_bias`` (whether the dense FFN has biases).

    Returns ``model``, whose aux losses are read with ``ms.aux_loss(model)`` after a forward;
    add them to the task loss so they reach the optimizer.

    Example::

        >>> model = ms.moefy(gpt2, num_experts=4, router="topk", every=2, top_k=2)
        >>> loss = lm_loss(model(ids)) + ms.aux_loss(model)
    """
    config = _moefy_config(config, num_experts, router, moe_options)
    _check_arguments(every, upcycle, noise, match)
    found = find_ffns(model, match)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    replacements: dict[str, nn.Module] = {}
    for i, (name, conversion) in enumerate(found):
        if (i + 1) % every:
            continue
        moe = upcycled_moe(conversion.spec, config, upcycle, noise, generator, name)
        training = model.get_submodule(name).training  # the MoE keeps the FFN's mode
        for path, new in conversion.install(moe).items():
            replacements[".".join(p for p in (name, path) if p)] = new.train(training)
    if "" in replacements:  # checked before anything changes: no half-converted model
        raise ValueError(
            "moefy cannot replace the model itself: pass its parent, e.g. moefy(nn.Sequential(ffn))"
        )
    for full, new in replacements.items():
        model.set_submodule(full, new)
    return model


def find_ffns(model: nn.Module, match: Match | None = None) -> list[tuple[str, Conversion]]:
    """The dense FFNs moefy would see, in module order, as (module name, Conversion).

    Raises ValueError listing the patterns searched when there is none."""
    found: list[tuple[str, Conversion]] = []
    inside: str | None = None  # a match's descendants belong to it
    for name, module in model.named_modules():
        if inside is not None and (inside == "" or name.startswith(inside + ".")):
            continue
        conversion = _convert_one(name, module, match)
        if conversion is not None:
            found.append((name, conversion))
            inside = name
    if not found:
        searched = "\n  ".join(label for label, _ in PATTERNS)
        how = "your match(name, module) accepted no module; " if match is not None else ""
        raise ValueError(
            f"moefy found no dense FFN in {type(model).__name__}: {how}searched for\n  {searched}"
            "\nPass match=fn returning an ms.convert.FFNSpec for other FFNs."
        )
    return found


def _convert_one(name: str, module: nn.Module, match: Match | None) -> Conversion | None:
    if match is None:
        return None if isinstance(module, (MoE, MoEFFN)) else recognise(name, module)
    chosen = match(name, module)
    if chosen is None or chosen is False:
        return None
    if chosen is True:
        conversion = recognise(name, module)
        if conversion is None:
            raise ValueError(
                f"match accepted {name!r} ({type(module).__name__}) but no built-in pattern "
                "recognises it; return an ms.convert.FFNSpec for it instead"
            )
        return conversion
    if not isinstance(chosen, FFNSpec):
        raise TypeError(
            f"match({name!r}, ...) returned {type(chosen).__name__}; expected an "
            "ms.convert.FFNSpec, True, False or None"
        )
    return Conversion(chosen, lambda moe: {"": MoEFFN(moe, chosen.dropout)})


def upcycled_moe(
    spec: FFNSpec,
    config: MoEConfig,
    upcycle: bool = True,
    noise: float = 0.0,
    generator: torch.Generator | None = None,
    name: str = "ffn",
) -> MoE:
    """The ``MoE`` of ``config`` as wide as ``spec``'s FFN (``name`` in errors), on its device
    and dtype; with ``upcycle`` every expert holds a copy of the dense weights (plus
    ``noise``)."""
    w = spec.w1
    config = config.inherit(
        f"the dense FFN {name!r}: ",
        d_model=spec.d_model,
        d_ff=spec.d_ff,
        activation=spec.activation,
    )
    config = dataclasses.replace(config, expert_bias=spec.has_bias)
    moe = MoE(config, device=w.device, dtype=w.dtype)
    if upcycle:
        with torch.no_grad():
            for pname, p in moe.experts.named_parameters():
                dense = getattr(spec, pname).to(p.dtype)  # (D, F) / (F, D) / (F,) / (D,)
                p.copy_(dense.expand_as(p))
                if noise > 0:
                    scale = noise * float(dense.float().std()) if dense.numel() > 1 else noise
                    z = torch.randn(p.shape, generator=generator, dtype=torch.float32)
                    p.add_(scale * z.to(p.device, p.dtype))
    return moe


def _moefy_config(
    config: MoEConfig | None, num_experts: int | None, router: str | None, options: dict
) -> MoEConfig:
    """The one config of every converted FFN: ``config``, or one built from the keywords."""
    if config is None:
        router = "switch" if router is None else router
        if not isinstance(router, str):
            raise TypeError(
                f"router={router!r} must be a name in ms.ROUTERS ({sorted(ROUTERS)}): every "
                "converted FFN gets its own router"
            )
        return MoEConfig(
            num_experts=8 if num_experts is None else num_experts, router=router, **options
        )
    given = [n for n, v in (("num_experts", num_experts), ("router", router)) if v is not None]
    if given or options:
        raise TypeError(
            f"moefy takes config or MoE keywords, not both: got config and "
            f"{given + sorted(options)}"
        )
    if not isinstance(config, MoEConfig) or not isinstance(config.router, str):
        raise TypeError(
            f"config={config!r} must be an ms.MoEConfig with a router name: every converted FFN "
            "gets its own router"
        )
    return config


def _check_arguments(every, upcycle, noise, match) -> None:
    check_positive_int("every", every)
    if not isinstance(upcycle, bool):
        raise TypeError(f"upcycle={upcycle!r} must be a bool")
    check_nonnegative_float("noise", noise)
    if match is not None and not callable(match):
        raise TypeError(f"match={match!r} must be a callable match(name, module) or None")
