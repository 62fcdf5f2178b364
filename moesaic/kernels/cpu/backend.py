"""Backend ``"cpu"``: the tuned CPU expert path behind ``ExpertBackend``.

oneDNN products (gemm.py), whole experts on worker threads (threads.py), a hand-written backward
with recycled gradient memory (ffn.py, gradpool.py), packed serving weights (packing.py) and,
for forward-only calls, the combine fused into the expert loop (combine.py). Every choice reads
one ``CpuTuning``; the result equals the "torch" backend's up to floating-point rounding.

Shape legend (docs/shapes.md): A assignments grouped by expert, D model dim, T tokens.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from moesaic.dispatch import DispatchPlan, combine
from moesaic.experts.backend import ExpertBackend
from moesaic.kernels.cpu.capability import cpu_capability
from moesaic.kernels.cpu.combine import scatter_combine
from moesaic.kernels.cpu.ffn import Run, Weights, sliced_ffn
from moesaic.kernels.cpu.gemm import onednn_available, packable, use_onednn
from moesaic.kernels.cpu.gradpool import GradPool
from moesaic.kernels.cpu.packing import PackCache
from moesaic.kernels.cpu.tuning import DEFAULT_TUNING, CpuTuning

__all__ = ["CpuBackend"]


def _modes_active() -> bool:
    """A dispatch or function mode (FlopCounterMode, fake tensors, ...) or a tracer is active:
    these are thread-local, so worker threads would escape them, and oneDNN's ops are opaque
    to them."""
    return bool(
        torch._C._len_torch_dispatch_stack()
        or torch._C._len_torch_function_stack()
        or torch.jit.is_tracing()
    )


@dataclasses.dataclass(frozen=True)
class CpuBackend(ExpertBackend):
    """The CPU expert path under ``tuning`` (moesaic/kernels/cpu/tuning.py)."""

    tuning: CpuTuning = DEFAULT_TUNING
    name: ClassVar[str] = "cpu"

    def supports(self, experts, x_AD: torch.Tensor) -> bool:
        return x_AD.device.type == "cpu"

    def forward(self, experts, x_AD: torch.Tensor, counts: list[int]) -> torch.Tensor:
        block = self.tuning.shared_block
        if experts.num_experts == 1 and x_AD.shape[0] > 2 * block:
            # one wide expert on every token (the shared expert): blocks keep its (rows, F)
            # temporaries in cache and small enough for the allocator to reuse
            return torch.cat([self.run(experts, c, [c.shape[0]]) for c in x_AD.split(block)])
        return self.run(experts, x_AD, counts)

    def forward_combined(
        self, experts, x_TD: torch.Tensor, plan: DispatchPlan
    ) -> torch.Tensor | None:
        # each expert gathers its own rows; with a sink it also writes straight to its tokens'
        # rows, else its output is combined afterwards
        sink = scatter_combine(plan, x_TD)
        y = self.run(experts, x_TD, plan.counts, sink=sink, rows=plan.token)
        return sink.result() if sink is not None else combine(y, plan)

    def can_pack(self, experts) -> bool:
        w = experts.w1
        return w.device.type == "cpu" and packable(self.tuning, w, experts.d_model * experts.d_ff)

    def pack(self, experts, rows_hint: int) -> None:
        w = experts.w1
        if (
            w.device.type != "cpu"
            or w.dtype not in (torch.float32, torch.bfloat16)
            or not onednn_available()
        ):
            raise ValueError(
                f"pack_for_inference needs fp32 or bf16 weights on CPU and a torch with oneDNN; "
                f"the experts are {w.dtype} on {w.device}"
            )
        if not onednn_available(w.dtype):
            raise ValueError(
                f"pack_for_inference: oneDNN cannot run {w.dtype} products on this CPU "
                f"({cpu_capability().describe()}), so these experts run on torch.mm unpacked "
                "(pack_experts skips them)"
            )
        if not self.can_pack(experts):
            raise ValueError(
                f"pack_for_inference: these experts run on torch.mm (CpuTuning.gemm="
                f"{self.tuning.gemm!r}, d_model * d_ff = {experts.d_model * experts.d_ff}, "
                f"min_weight={self.tuning.min_weight}), so a packed copy would not be used; "
                "build them with backend=CpuBackend(CpuTuning(gemm='onednn')) to force it"
            )
        experts.packs = PackCache(rows_hint)
        experts.packs.get(experts.w1, experts.w2, experts.w3)

    @torch.compiler.disable  # worker threads, a hand-written autograd Function: run eagerly
    def run(self, experts, x_AD, counts, *, sink=None, rows=None) -> torch.Tensor | None:
        """The experts on rows of ``x_AD`` grouped by expert; ``sink`` and ``rows`` (forward-only
        calls) as in ``moesaic.kernels.cpu.ffn.sliced_ffn``."""
        w = Weights(experts.w1, experts.w2, experts.w3, *experts.biases)
        pool = experts.kernel_state.get("cpu.grad_pool") if self.tuning.recycle_grads else None
        if pool is None and self.tuning.recycle_grads:
            pool = experts.kernel_state["cpu.grad_pool"] = GradPool()
        if pool is not None and torch.is_grad_enabled():
            for p in (w.w1, w.w2, w.w3):
                if p is not None:
                    pool.watch(p)
        if torch.is_autocast_enabled(x_AD.device.type):
            # each product would be autocast on its own; cast once here instead
            dtype = torch.get_autocast_dtype(x_AD.device.type)
            x_AD = x_AD.to(dtype)
            w = Weights(*(t.to(dtype) if t is not None else None for t in w))
        size, modes = experts.d_model * experts.d_ff, _modes_active()
        onednn = use_onednn(self.tuning, x_AD, size) and not modes
        packs = experts.packs
        if packs is not None and (
            modes or x_AD.dtype != experts.w1.dtype or not packable(self.tuning, x_AD, size)
        ):
            packs = None  # (under autocast the cast weights are new tensors every call)
        threads = 1 if self.tuning.workers == "loop" or modes else torch.get_num_threads()
        run = Run(experts.activation, threads, onednn, self.tuning, pool, size)
        with torch.autocast(x_AD.device.type, enabled=False):
            return sliced_ffn(x_AD, w, counts, run, packs=packs, sink=sink, rows=rows)
