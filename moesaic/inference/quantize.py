"""int8 experts for serving: each expert matrix as int8 with one fp32 scale per output channel
(symmetric, ``scale = max|w_row| / 127``).

The products run on one of the int8 kernels of ``moesaic/inference/int8.py``: by default the
one ``int8_kernel(D * F)`` picks for this CPU and the experts' size (integer products through
torch's dynamic quantised linear where an x86 fbgemm engine works and the matrices are large
enough for it to beat fp32, otherwise the dequantising reference), or the one named:
``"dynamic"``, ``"int8pack"`` (weight-only, ``torch._weight_int8pack_mm``) or ``"dequantise"``.
``QuantizedExperts.kernel`` is the kernel in use. Either way the weights are held as int8: a
quarter of their fp32 bytes, plus the scales. ``quantize(model, only_faster=True)`` leaves in
fp32 the layers where the rule finds int8 products slower than fp32 ones.

Shape legend (docs/shapes.md): A assignments grouped by expert, D model dim, F expert hidden,
E experts.
"""

from __future__ import annotations

import torch
from torch import nn

from moesaic.experts import Experts
from moesaic.inference.int8 import KERNELS, Int8Kernel, engine_kernel, int8_kernel
from moesaic.layer import MoE

__all__ = [
    "quantize",
    "QuantizedExperts",
    "quantize_rows",
    "int8_kernel",
    "engine_kernel",
    "int8_kernel_available",
]


def int8_kernel_available() -> bool:
    """Whether this torch build runs ``torch._weight_int8pack_mm`` on CPU fp32 activations
    (the ``"int8pack"`` kernel)."""
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
    ``kernel`` packs them once per expert (again after ``load_state_dict``); a gated expert's
    ``w1`` and ``w3`` are packed as one (2F, D) matrix, so x is read (and quantised) once.
    """

    def __init__(self, experts: Experts, kernel: Int8Kernel) -> None:
        super().__init__()
        self.num_experts, self.d_model, self.d_ff = (
            experts.num_experts,
            experts.d_model,
            experts.d_ff,
        )
        self.act, self.gated = experts.act, experts.gated
        self.kernel = kernel
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
        self._pack()
        self.register_load_state_dict_post_hook(lambda module, _keys: module._pack())

    def _pack(self) -> None:
        """Per expert (up, down) as the kernel packs them; up is w1, or [w1; w3] when gated."""
        up = ("1", "3") if self.gated else ("1",)

        def rows(kind: str, ids: tuple[str, ...], e: int) -> torch.Tensor | None:
            parts = [getattr(self, f"{kind}{i}") for i in ids]
            return None if parts[0] is None else torch.cat([p[e] for p in parts])

        self._packed = [
            tuple(
                self.kernel.pack(rows("q", ids, e), rows("s", ids, e), rows("b", ids, e))
                for ids in (up, ("2",))
            )
            for e in range(self.num_experts)
        ]

    def forward_combined(self, x_TD: torch.Tensor, plan) -> None:
        return None  # the layer permutes, calls forward and combines

    @torch.no_grad()
    def forward(self, x_AD: torch.Tensor, counts: list[int]) -> torch.Tensor:
        y = []
        for e, x in enumerate(x_AD.split(counts)):
            if x.shape[0] == 0:
                continue
            up, down = self._packed[e]
            h_AF = self.kernel.linear(x, up)  # (A, 2F) when gated: [x w1 | x w3]
            if self.gated:
                a, g = h_AF.chunk(2, dim=-1)
                h_AF = self.act(a) * g
            else:
                h_AF = self.act(h_AF)
            y.append(self.kernel.linear(h_AF, down))
        return torch.cat(y) if y else x_AD.new_empty(0, self.d_model)

    def nbytes(self) -> int:
        """Bytes of the quantised weights, scales and biases (the buffers; the ``"dynamic"``
        kernel's packed copy, fbgemm's own int8 layout, comes on top)."""
        return sum(t.numel() * t.element_size() for t in self.buffers() if t.numel())

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, int8, kernel={self.kernel.describe()!r}"


def quantize(model: nn.Module, *, kernel: str | None = None, only_faster: bool = False) -> int:
    """Replace every MoE layer's experts in ``model`` by int8 ``QuantizedExperts`` (in place, for
    serving; the float expert weights are released). ``kernel``: None takes ``int8_kernel(D *
    F)``, this CPU's default for the layer's expert size; or ``"dynamic"``, ``"int8pack"``,
    ``"dequantise"``. ``only_faster``: leave in fp32 the layers whose default kernel is not
    ``"dynamic"`` (where int8 products lose to fp32), so int8 never slows the model. Returns the
    number of layers quantised."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(only_faster, bool):
        raise TypeError(f"only_faster={only_faster!r} must be True or False")
    if kernel is not None and kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r} must be None or one of {sorted(KERNELS)}")
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    if not layers:
        raise ValueError("model has no MoE layers: there are no experts to quantise")
    for layer in layers:
        if not isinstance(layer.experts, Experts):
            raise ValueError(
                f"an MoE layer's experts are {type(layer.experts).__name__}, not float "
                "Experts: quantise before offloading, and only once"
            )
    named = None if kernel is None else named_kernel(kernel)
    done = 0
    for layer in layers:
        chosen = named or int8_kernel(layer.experts.d_model * layer.experts.d_ff)
        if only_faster and chosen.name != "dynamic":
            continue
        layer.experts = QuantizedExperts(layer.experts, chosen)
        done += 1
    return done


def named_kernel(name: str) -> Int8Kernel:
    """The kernel ``name``, refusing one this CPU or torch build cannot run."""
    if name == "int8pack" and not int8_kernel_available():
        raise ValueError(
            f"kernel='int8pack' but torch {torch.__version__} has no CPU torch._weight_int8pack_mm"
        )
    if name == "dynamic":
        default = engine_kernel()
        if default.name != "dynamic":
            raise ValueError(f"kernel='dynamic' but this CPU's int8 kernel is {default.describe()}")
        return default
    return KERNELS[name]()
