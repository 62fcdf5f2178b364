"""Weight-only int8 experts for serving: each expert matrix as int8 with one fp32 scale per
output channel (symmetric, ``scale = max|w_row| / 127``), activations left in floating point.

The product runs through ``torch._weight_int8pack_mm`` (x (M, K) times int8 W (N, K) with scales
(N,)), torch's CPU kernel for weight-only int8, where this torch build has it and the activations'
dtype suits it; otherwise each call dequantises the expert's matrix and runs ``F.linear``, and
``quantize`` says so once (``QuantizedExperts.kernel`` names the path taken). Either way the
weights are held as int8: a quarter of their fp32 bytes, plus the scales.

Shape legend (docs/shapes.md): A assignments grouped by expert, D model dim, F expert hidden,
E experts.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.nn import functional as F

from moesaic.experts import Experts
from moesaic.layer import MoE

__all__ = ["quantize", "QuantizedExperts", "quantize_rows", "int8_kernel_available"]

KERNEL = "torch._weight_int8pack_mm"
FALLBACK = "dequantise + F.linear"


def int8_kernel_available() -> bool:
    """Whether this torch build runs ``torch._weight_int8pack_mm`` on CPU fp32 activations."""
    if not hasattr(torch, "_weight_int8pack_mm"):
        return False
    try:
        w = torch.ones(8, 32, dtype=torch.int8)
        y = torch._weight_int8pack_mm(torch.ones(2, 32), w, torch.ones(8))
        return bool(torch.allclose(y, torch.full((2, 8), 32.0)))
    except (RuntimeError, NotImplementedError):
        return False


def quantize_rows(w_NK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 (N, K), fp32 scales (N,)) with ``w ~= q * scale[:, None]`` (symmetric, per row)."""
    scale_N = w_NK.detach().float().abs().amax(dim=1).clamp(min=1e-12) / 127
    q_NK = torch.round(w_NK.detach().float() / scale_N[:, None]).clamp(-127, 127)
    return q_NK.to(torch.int8).contiguous(), scale_N


class QuantizedExperts(nn.Module):
    """Stands in for a layer's ``Experts`` with int8 weights (forward-only: no parameters).

    Buffers: ``q1`` (E, F, D), ``q2`` (E, D, F)[, ``q3`` (E, F, D)] int8 in ``F.linear``'s
    (out, in) order, ``s1``/``s2``[/``s3``] (E, out) fp32 scales; biases kept as they were.
    """

    def __init__(self, experts: Experts, use_kernel: bool) -> None:
        super().__init__()
        self.num_experts, self.d_model, self.d_ff = (
            experts.num_experts,
            experts.d_model,
            experts.d_ff,
        )
        self.act, self.gated = experts.act, experts.gated
        self.kernel = KERNEL if use_kernel else FALLBACK
        # the layer checks inputs against w1's device and dtype; no float weights are kept
        self.register_buffer("w1", torch.empty(0, dtype=experts.w1.dtype), persistent=False)
        for i in ("1", "2", "3"):
            w = getattr(experts, f"w{i}")
            if w is None:
                continue
            pairs = [quantize_rows(w[e].t()) for e in range(w.shape[0])]  # (out, in) each
            self.register_buffer(f"q{i}", torch.stack([q for q, _ in pairs]))
            self.register_buffer(f"s{i}", torch.stack([s for _, s in pairs]))
        for name in ("b1", "b2", "b3"):
            b = getattr(experts, name)
            self.register_buffer(name, None if b is None else b.detach().clone())

    def forward_combined(self, x_TD: torch.Tensor, plan) -> None:
        return None  # the layer permutes, calls forward and combines

    @torch.no_grad()
    def forward(self, x_AD: torch.Tensor, counts: list[int]) -> torch.Tensor:
        y = []
        for e, x in enumerate(x_AD.split(counts)):
            if x.shape[0] == 0:
                continue
            h = self.act(self._linear(x, "1", e))
            if self.gated:
                h = h * self._linear(x, "3", e)
            y.append(self._linear(h, "2", e))
        return torch.cat(y) if y else x_AD.new_empty(0, self.d_model)

    def _linear(self, x: torch.Tensor, i: str, e: int) -> torch.Tensor:
        q, s = getattr(self, f"q{i}")[e], getattr(self, f"s{i}")[e]
        b = getattr(self, f"b{i}")
        if self.kernel == KERNEL and x.dtype == torch.float32:
            y = torch._weight_int8pack_mm(x.contiguous(), q, s)
        else:
            y = F.linear(x, (q.to(s.dtype) * s[:, None]).to(x.dtype))
        return y if b is None else y + b[e].to(y.dtype)

    def nbytes(self) -> int:
        """Bytes of the quantised weights, scales and biases."""
        return sum(t.numel() * t.element_size() for t in self.buffers() if t.numel())

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, int8 weight-only, kernel={self.kernel!r}"


def quantize(model: nn.Module, *, kernel: bool | None = None) -> int:
    """Replace every MoE layer's experts in ``model`` by int8 weight-only ``QuantizedExperts``
    (in place, for serving; the float expert weights are released). ``kernel``: None uses
    ``torch._weight_int8pack_mm`` where available (saying once when it is not), False forces
    the dequantising path. Returns the number of layers quantised."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if kernel is not None and not isinstance(kernel, bool):
        raise TypeError(f"kernel={kernel!r} must be True, False or None")
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    if not layers:
        raise ValueError("model has no MoE layers: there are no experts to quantise")
    for layer in layers:
        if not isinstance(layer.experts, Experts):
            raise ValueError(
                f"an MoE layer's experts are {type(layer.experts).__name__}, not float "
                "Experts: quantise before offloading, and only once"
            )
    available = int8_kernel_available()
    if kernel and not available:
        raise ValueError(f"kernel=True but this torch build has no CPU {KERNEL}")
    use = available if kernel is None else kernel
    if kernel is None and not available:
        warnings.warn(
            f"{KERNEL} is not available in torch {torch.__version__}: int8 experts will "
            "dequantise each matrix per call (same results, no int8 speed-up)",
            stacklevel=2,
        )
    for layer in layers:
        layer.experts = QuantizedExperts(layer.experts, use)
    return len(layers)
