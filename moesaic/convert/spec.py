"""What a recognised dense FFN is made of, and the modules that stand in for it after moefy.

A dense FFN ``y = act(x W1 + b1) W2 + b2`` (gated: ``(silu(x W1 + b1) * (x W3 + b3)) W2 + b2``)
is described by an ``FFNSpec`` whose weights use the experts' layout: ``w1`` (D, F), ``w2`` (F, D),
``w3`` (D, F), i.e. ``nn.Linear.weight`` transposed and ``transformers.Conv1D.weight`` as stored.

Shape legend (docs/shapes.md): D model dim, F hidden width.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from moesaic._validate import check_choice
from moesaic.experts import ACTIVATIONS
from moesaic.layer import MoE

__all__ = ["FFNSpec", "MoEFFN", "MoEResidualNorm", "Passthrough", "activation_name"]


@dataclasses.dataclass(kw_only=True)
class FFNSpec:
    """Weights and activation of one dense FFN (see the module docstring for the layouts).

    ``dropout``: a module applied to the FFN output (kept by the replacement, e.g. GPT-2's
    residual dropout); None for none.
    """

    w1: torch.Tensor
    w2: torch.Tensor
    activation: str
    w3: torch.Tensor | None = None
    b1: torch.Tensor | None = None
    b2: torch.Tensor | None = None
    b3: torch.Tensor | None = None
    dropout: nn.Module | None = None

    def __post_init__(self) -> None:
        check_choice("FFNSpec.activation", self.activation, ACTIVATIONS)
        D, F_ = self.w1.shape
        if tuple(self.w2.shape) != (F_, D):
            raise ValueError(
                f"FFNSpec.w2.shape={tuple(self.w2.shape)} must be (F, D) = {(F_, D)} given "
                f"w1.shape={(D, F_)}"
            )
        if (self.activation == "swiglu") != (self.w3 is not None):
            raise ValueError("FFNSpec.w3 is needed exactly when activation='swiglu'")
        if (self.b1 is None) != (self.b2 is None) or (self.b3 is not None and self.b1 is None):
            raise ValueError("FFNSpec: give b1 and b2 (and b3 for swiglu) together, or no biases")
        if self.w3 is not None and self.b1 is not None and self.b3 is None:
            self.b3 = self.w3.new_zeros(F_)  # a gated FFN with biases only on w1 / w2

    @classmethod
    def from_linears(
        cls,
        fc1: nn.Linear,
        fc2: nn.Linear,
        activation: str,
        gate: nn.Linear | None = None,
        dropout: nn.Module | None = None,
    ) -> FFNSpec:
        """``fc2(act(fc1(x)))``; with ``gate`` the SwiGLU ``fc2(silu(gate(x)) * fc1(x))``."""
        if gate is not None:  # swiglu: w1 is the gated projection, w3 the linear one
            return cls(
                w1=gate.weight.detach().t(),
                w3=fc1.weight.detach().t(),
                w2=fc2.weight.detach().t(),
                b1=_bias(gate, fc2),
                b3=_bias(fc1, fc2),
                b2=_bias(fc2, gate),
                activation="swiglu",
                dropout=dropout,
            )
        return cls(
            w1=fc1.weight.detach().t(),
            w2=fc2.weight.detach().t(),
            b1=_bias(fc1, fc2),
            b2=_bias(fc2, fc1),
            activation=activation,
            dropout=dropout,
        )

    @property
    def d_model(self) -> int:
        return self.w1.shape[0]

    @property
    def d_ff(self) -> int:
        return self.w1.shape[1]

    @property
    def has_bias(self) -> bool:
        return self.b1 is not None


def _bias(linear: nn.Linear, other: nn.Linear) -> torch.Tensor | None:
    """``linear``'s bias; zeros when only ``other`` has one (experts have all biases or none)."""
    if linear.bias is not None:
        return linear.bias.detach()
    if other.bias is not None:
        return linear.weight.new_zeros(linear.weight.shape[0])
    return None


_PROBE = torch.linspace(-6.0, 6.0, 241, dtype=torch.float64)
_CANDIDATES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


def activation_name(act: Callable[[torch.Tensor], torch.Tensor]) -> str | None:
    """Which expert activation ``act`` computes (a module or function), by evaluating it on a
    grid of points; None when it is none of them exactly (to 1e-6)."""
    try:
        with torch.no_grad():
            out = act(_PROBE.clone())
    except Exception:  # an activation that cannot take a float64 vector is not one of ours
        return None
    if not isinstance(out, torch.Tensor) or out.shape != _PROBE.shape:
        return None
    for name, fn in _CANDIDATES.items():
        if torch.allclose(out.double(), fn(_PROBE), atol=1e-6, rtol=0):
            return name
    return None


class MoEFFN(nn.Module):
    """Stands in for a dense FFN module: ``dropout(moe(x))``, same call ``forward(x)``.

    Shape: x (..., D) -> (..., D).
    """

    def __init__(self, moe: MoE, dropout: nn.Module | None = None) -> None:
        super().__init__()
        self.moe = moe
        self.dropout = dropout if dropout is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.moe(x))


class Passthrough(nn.Module):
    """Returns its input: stands in for BERT's ``intermediate``, whose work the MoE now does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class MoEResidualNorm(nn.Module):
    """Stands in for BERT's ``output``: ``norm(dropout(moe(h)) + input_tensor)``, same call
    ``forward(hidden_states, input_tensor)``. After moefy ``hidden_states`` is the attention
    output (``intermediate`` passes it through), the FFN's input.

    Shape: hidden_states, input_tensor (..., D) -> (..., D).
    """

    def __init__(self, moe: MoE, norm: nn.Module, dropout: nn.Module | None = None) -> None:
        super().__init__()
        self.moe, self.LayerNorm = moe, norm  # BERT's parameter name, so its weights keep names
        self.dropout = dropout if dropout is not None else nn.Identity()

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.moe(hidden_states)) + input_tensor)
