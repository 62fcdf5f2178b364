"""Dense FFN patterns ``moefy`` recognises, each a function ``(name, module) -> Conversion | None``.

A pattern looks at attribute names and types only (duck typing), so recognising transformers'
or timm's modules needs neither package. Activations are identified by evaluating them
(``activation_name``), which covers functions, ``nn`` modules and transformers' ``ACT2FN``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from torch import nn

from moesaic.convert.spec import (
    FFNSpec,
    MoEFFN,
    MoEResidualNorm,
    Passthrough,
    activation_name,
)
from moesaic.layer import MoE

__all__ = ["Conversion", "PATTERNS", "recognise"]


@dataclasses.dataclass
class Conversion:
    """A recognised FFN: its weights and how to put the MoE in its place.

    ``install(moe)`` returns ``{child path relative to the matched module: new module}``; the
    empty path "" replaces the matched module itself.
    """

    spec: FFNSpec
    install: Callable[[MoE], dict[str, nn.Module]]


def _replace_with_wrapper(spec: FFNSpec) -> Conversion:
    return Conversion(spec, lambda moe: {"": MoEFFN(moe, spec.dropout)})


def _act(owner: str, act) -> str:
    name = activation_name(act)
    if name is None:
        raise ValueError(
            f"{owner}: activation {act!r} is not one moefy's experts compute exactly "
            "(gelu, gelu_tanh, relu, silu)"
        )
    return name


def _is_dropout(m: nn.Module) -> bool:
    return isinstance(m, (nn.Dropout, nn.Identity))


def sequential(name: str, module: nn.Module) -> Conversion | None:
    """``nn.Sequential(Linear, act, Linear)``, optionally followed by a Dropout."""
    if not isinstance(module, nn.Sequential) or len(module) not in (3, 4):
        return None
    fc1, act, fc2, *rest = list(module)
    if not (isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear)):
        return None
    if rest and not _is_dropout(rest[0]):
        return None
    if fc1.out_features != fc2.in_features or fc1.in_features != fc2.out_features:
        return None
    act_name = activation_name(act)
    if act_name is None:
        return None
    return _replace_with_wrapper(
        FFNSpec.from_linears(fc1, fc2, act_name, dropout=rest[0] if rest else None)
    )


def gpt2(name: str, module: nn.Module) -> Conversion | None:
    """GPT-2's MLP: ``dropout(c_proj(act(c_fc(x))))`` with transformers ``Conv1D`` projections
    (weight stored (in, out), the experts' layout)."""
    fc, proj = getattr(module, "c_fc", None), getattr(module, "c_proj", None)
    if type(fc).__name__ != "Conv1D" or type(proj).__name__ != "Conv1D":
        return None
    spec = FFNSpec(
        w1=fc.weight.detach(),
        w2=proj.weight.detach(),
        b1=fc.bias.detach(),
        b2=proj.bias.detach(),
        activation=_act(f"{name}.act", module.act),
        dropout=getattr(module, "dropout", None),
    )
    return _replace_with_wrapper(spec)


def llama(name: str, module: nn.Module) -> Conversion | None:
    """LLaMA / Mistral / Qwen MLP: ``down_proj(silu(gate_proj(x)) * up_proj(x))`` (SwiGLU)."""
    parts = [getattr(module, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    if not all(isinstance(p, nn.Linear) for p in parts):
        return None
    act = getattr(module, "act_fn", None)
    if _act(f"{name}.act_fn", act) != "silu":
        raise ValueError(f"{name}.act_fn must be silu for a SwiGLU FFN, got {act!r}")
    gate, up, down = parts
    return _replace_with_wrapper(FFNSpec.from_linears(up, down, "swiglu", gate=gate))


def bert(name: str, module: nn.Module) -> Conversion | None:
    """A BERT layer's ``intermediate`` (dense + act) and ``output`` (dense, dropout, residual,
    LayerNorm). ``intermediate`` becomes a pass-through and ``output`` computes
    ``LayerNorm(dropout(moe(h)) + input_tensor)``, keeping both call signatures."""
    inter, out = getattr(module, "intermediate", None), getattr(module, "output", None)
    fc1, fc2 = getattr(inter, "dense", None), getattr(out, "dense", None)
    norm = getattr(out, "LayerNorm", None)
    if not (isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear) and norm is not None):
        return None
    act = _act(f"{name}.intermediate.intermediate_act_fn", inter.intermediate_act_fn)
    spec = FFNSpec.from_linears(fc1, fc2, act)
    dropout = getattr(out, "dropout", None)
    return Conversion(
        spec,
        lambda moe: {
            "intermediate": Passthrough(),
            "output": MoEResidualNorm(moe, norm, dropout),
        },
    )


def timm_mlp(name: str, module: nn.Module) -> Conversion | None:
    """timm's ``Mlp``: ``drop2(fc2(norm(drop1(act(fc1(x))))))``; needs ``norm`` to be Identity
    and ``drop1`` to drop nothing (the experts have no hidden norm or dropout)."""
    fc1, fc2, act = (getattr(module, n, None) for n in ("fc1", "fc2", "act"))
    if not (isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear) and act is not None):
        return None
    norm = getattr(module, "norm", None)
    if norm is not None and not isinstance(norm, nn.Identity):
        raise ValueError(f"{name}.norm={norm!r}: moefy supports timm Mlp with norm=Identity only")
    drop1 = getattr(module, "drop1", None)
    if isinstance(drop1, nn.Dropout) and drop1.p > 0:
        raise ValueError(f"{name}.drop1.p={drop1.p}: moefy needs no hidden dropout (p=0)")
    act_name = _act(f"{name}.act", act)
    return _replace_with_wrapper(
        FFNSpec.from_linears(fc1, fc2, act_name, dropout=getattr(module, "drop2", None))
    )


def moesaic_dense(name: str, module: nn.Module) -> Conversion | None:
    """moesaic's own ``models.lm.DenseFFN`` (w1, w2, w3 Linears): replaced by a bare ``MoE``,
    so a converted ``MoELM`` has exactly the parameter names of an MoE ``MoELM``."""
    from moesaic.models.lm import DenseFFN

    if not isinstance(module, DenseFFN):
        return None
    gated = module.w3 is not None
    act = "swiglu" if gated else _act(f"{name}.act", module.act)
    spec = FFNSpec.from_linears(
        module.w3 if gated else module.w1, module.w2, act, gate=module.w1 if gated else None
    )
    return Conversion(spec, lambda moe: {"": moe})


# (name shown in the unrecognised-model error, recogniser)
PATTERNS: list[tuple[str, Callable[[str, nn.Module], Conversion | None]]] = [
    ("moesaic DenseFFN (w1/w2[/w3])", moesaic_dense),
    ("nn.Sequential(Linear, act, Linear[, Dropout])", sequential),
    ("GPT-2 MLP (c_fc/c_proj Conv1D)", gpt2),
    ("LLaMA/Mistral MLP (gate_proj/up_proj/down_proj)", llama),
    ("BERT layer (intermediate.dense/output.dense + LayerNorm)", bert),
    ("timm Mlp (fc1/act/fc2)", timm_mlp),
]


def recognise(name: str, module: nn.Module) -> Conversion | None:
    """The first pattern that matches ``module``, or None."""
    for _, pattern in PATTERNS:
        found = pattern(name, module)
        if found is not None:
            return found
    return None
