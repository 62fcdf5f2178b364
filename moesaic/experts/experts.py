"""Stacked expert FFNs: parameters, initialisation and the choice of backend.

Shape legend (docs/shapes.md): A assignments (sorted by expert), D model dim, F expert hidden,
E experts, T tokens.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from moesaic._validate import check_dropout, check_positive_int, check_tokens
from moesaic.experts import grouped as _grouped  # noqa: F401  (registers "grouped")
from moesaic.experts import loop as _loop  # noqa: F401  (registers "torch")
from moesaic.experts.backend import (
    ExpertBackend,
    find_backend,
    get_backend,
    records_autograd,
)

__all__ = ["Experts", "ACTIVATIONS", "expert_weights"]

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),  # GPT-2's "gelu_new"
    "relu": F.relu,
    "silu": F.silu,
    "swiglu": F.silu,  # silu(x w1) * (x w3), Shazeer 2020 "GLU Variants Improve Transformer"
}


def expert_weights(num_experts: int, rows: int, cols: int, **kw) -> torch.Tensor:
    """Uninitialised (E, rows, cols) expert weights, each expert's matrix stored transposed
    (strides (rows * cols, 1, rows), nn.Linear's (out, in) order in memory): ``w[e].t()`` is the
    contiguous matrix ``F.linear`` takes, and the operand layout oneDNN's products read
    (moesaic/kernels/cpu/gemm.py). Any layout computes the same."""
    return torch.empty_strided((num_experts, rows, cols), (rows * cols, 1, rows), **kw)


class Experts(nn.Module):
    """E independent FFNs ``y = act(x w1[e]) w2[e]`` (swiglu: ``(silu(x w1[e]) * x w3[e]) w2[e]``).

    Args:
        num_experts: E.
        d_model: D.
        d_ff: F, hidden width of each expert.
        activation: "gelu" | "gelu_tanh" | "relu" | "silu" | "swiglu".
        bias: add per-expert biases ``b1`` (E, F), ``b2`` (E, D) and for swiglu ``b3`` (E, F):
            ``y = act(x w1[e] + b1[e]) w2[e] + b2[e]`` (for upcycling dense FFNs with biases).
        backend: how the experts run (moesaic/experts/backend.py): "torch", a plain autograd
            loop over experts; "grouped", ``torch._grouped_mm``; "cpu", the tuned CPU kernels
            (moesaic/kernels/cpu/: oneDNN products, worker threads, a hand-written backward);
            "auto" (default) picks grouped for bf16 on CUDA, cpu for CPU tensors and torch
            otherwise. An ``ExpertBackend`` instance (e.g. ``moesaic.kernels.cpu.CpuBackend``
            with its own tuning) is used as given. Every backend computes the same function.
        device, dtype: for the parameters.

    Shape:
        forward(x_AD, counts): x (A, D) grouped by expert with ``counts[e]`` rows for expert e,
        sum(counts) == A. Output (A, D).

    Parameters ``w1`` (E, D, F), ``w2`` (E, F, D) and for swiglu ``w3`` (E, D, F) are public names,
    as are ``b1``, ``b2``, ``b3`` (None without ``bias``). Each expert's weight matrix is stored
    transposed (``expert_weights``: ``w1`` has strides (D * F, 1, D)), the layout the products
    read fastest; ``.contiguous()`` copies compute the same, only slower.
    """

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        d_ff: int,
        activation: str = "gelu",
        *,
        bias: bool = False,
        backend: str | ExpertBackend = "auto",
        dropout: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_dropout("dropout", dropout)
        for name, value in (("num_experts", num_experts), ("d_model", d_model), ("d_ff", d_ff)):
            check_positive_int(name, value)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r} is not one of {tuple(ACTIVATIONS)}")
        if not isinstance(bias, bool):
            raise TypeError(f"bias={bias!r} must be a bool")
        if not isinstance(backend, ExpertBackend) and backend != "auto":
            get_backend(backend)  # an unknown name fails here, naming the ones there are
        self.num_experts, self.d_model, self.d_ff = num_experts, d_model, d_ff
        self.activation, self.backend = activation, backend
        self.dropout = float(dropout)  # on the hidden activations, in training only
        self.act = ACTIVATIONS[activation]
        kw = {"device": device, "dtype": dtype}
        self.w1 = nn.Parameter(expert_weights(num_experts, d_model, d_ff, **kw))
        self.w2 = nn.Parameter(expert_weights(num_experts, d_ff, d_model, **kw))
        self.w3 = (
            nn.Parameter(expert_weights(num_experts, d_model, d_ff, **kw)) if self.gated else None
        )
        self.b1 = nn.Parameter(torch.empty(num_experts, d_ff, **kw)) if bias else None
        self.b2 = nn.Parameter(torch.empty(num_experts, d_model, **kw)) if bias else None
        self.b3 = (
            nn.Parameter(torch.empty(num_experts, d_ff, **kw)) if bias and self.gated else None
        )
        self.reset_parameters()
        # per-module state a backend keeps between calls (gradient memory, packed weights);
        # its values copy and pickle as empty
        self.kernel_state: dict[str, object] = {}
        self.packs = None  # the packed serving copy (pack_for_inference), backend-specific

    @property
    def gated(self) -> bool:
        return self.activation == "swiglu"

    @property
    def biases(self) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        return self.b1, self.b2, self.b3

    def reset_parameters(self) -> None:
        # Each expert like a fresh nn.Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), so an MoE and a
        # dense FFN of the same widths start at the same scale.
        fans = ((self.w1, self.b1, self.d_model), (self.w2, self.b2, self.d_ff))
        for w, b, fan_in in (*fans, (self.w3, self.b3, self.d_model)):
            bound = 1.0 / math.sqrt(fan_in)
            for p in (w, b):
                if p is not None:
                    nn.init.uniform_(p, -bound, bound)

    def extra_repr(self) -> str:
        backend = self.backend if isinstance(self.backend, str) else self.backend.name
        return (
            f"num_experts={self.num_experts}, d_model={self.d_model}, d_ff={self.d_ff}, "
            f"activation={self.activation!r}, bias={self.b1 is not None}, backend={backend!r}"
            + (f", dropout={self.dropout}" if self.dropout else "")
        )

    def backend_for(self, x: torch.Tensor) -> ExpertBackend:
        """The backend that runs a call on ``x`` (resolves "auto"). Expert dropout in training
        runs the plain loop, the one backend that applies it."""
        if self.training and self.dropout > 0:
            return get_backend("torch")
        if isinstance(self.backend, ExpertBackend):
            return self.backend
        if self.backend != "auto":
            return get_backend(self.backend)
        for name in ("grouped", "cpu"):
            backend = find_backend(name)
            if backend is not None and backend.supports(self, x):
                return backend
        return get_backend("torch")

    def forward(self, x_AD: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Expert e's FFN on rows ``sum(counts[:e]) .. sum(counts[:e + 1])`` of ``x_AD`` (A, D)."""
        counts = self._check(x_AD, counts)
        return self.backend_for(x_AD).forward(self, x_AD, counts)

    def forward_combined(self, x_TD: torch.Tensor, plan) -> torch.Tensor | None:
        """Forward-only calls (no autograd recording): the experts on the plan's rows of
        ``x_TD`` and the combine, in one pass when the backend has one (then the combined
        (T, D) output), else None."""
        if records_autograd(x_TD, *self.parameters()):
            return None
        return self.backend_for(x_TD).forward_combined(self, x_TD, plan)

    def pack_for_inference(self, rows_hint: int = 64) -> Experts:
        """Keep the weights also in a packed layout for forward-only calls (CPU backend:
        oneDNN's blocked layout, so the products skip repacking each expert's weights on every
        call). Costs a second copy of w1, w2 (and w3), rebuilt after the weights change.
        Training calls are unaffected. ``rows_hint`` is the typical rows per expert.
        ``unpack()`` drops the copy."""
        check_positive_int("rows_hint", rows_hint)
        backend = self._serving_backend()
        if backend is None:
            raise ValueError(
                "pack_for_inference needs the CPU kernels (moesaic.kernels.cpu), which are not "
                "importable here"
            )
        backend.pack(self, rows_hint)
        return self

    def can_pack(self) -> bool:
        """Whether ``pack_for_inference`` would keep a copy that forward-only calls use."""
        backend = self._serving_backend()
        return backend is not None and backend.can_pack(self)

    def _serving_backend(self) -> ExpertBackend | None:
        """The backend that runs forward-only calls on CPU ("auto" means "cpu"), or None when it
        is not available."""
        if isinstance(self.backend, ExpertBackend):
            return self.backend
        name = "cpu" if self.backend == "auto" else self.backend
        return find_backend(name)

    def unpack(self) -> Experts:
        """Drop the packed copy made by ``pack_for_inference``."""
        self.packs = None
        return self

    def _check(self, x_AD: torch.Tensor, counts: list[int]) -> list[int]:
        check_tokens("x_AD", x_AD, self.d_model, self.w1)
        E = self.w1.shape[0]  # the local experts under expert parallelism
        if isinstance(counts, torch.Tensor):
            counts = counts.tolist()
        if (
            not isinstance(counts, (list, tuple))
            or len(counts) != E
            or not all(isinstance(c, int) and c >= 0 for c in counts)
        ):
            raise ValueError(f"counts={counts!r} must be {E} ints >= 0 (one per expert)")
        if sum(counts) != x_AD.shape[0]:
            raise ValueError(f"sum(counts)={sum(counts)} must equal x_AD.shape[0]={x_AD.shape[0]}")
        return list(counts)
