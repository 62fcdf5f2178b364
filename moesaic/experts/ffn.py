"""Stacked expert FFNs run on contiguous per-expert slices.

Shape legend (docs/shapes.md): A assignments (sorted by expert), D model dim, F expert hidden,
E experts.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from moesaic._validate import check_choice, check_positive_int, check_tokens
from moesaic.experts.dispatch import ScatterCombine
from moesaic.experts.gemm import (
    ACT,
    BACKENDS,
    MIN_WEIGHT,
    PackCache,
    onednn_available,
    packable,
    use_onednn,
)
from moesaic.experts.gradpool import GradPool
from moesaic.experts.sliced import records_autograd, sliced_ffn
from moesaic.kernels.cpu.capability import cpu_capability

__all__ = ["Experts", "ACTIVATIONS", "expert_weights"]

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    **ACT,  # gelu, gelu_tanh (GPT-2's "gelu_new"), relu, silu
    "swiglu": F.silu,  # silu(x w1) * (x w3), Shazeer 2020 "GLU Variants Improve Transformer"
}
IMPLS = ("auto", "loop", "threads", "grouped")
AUTO_THREADS = True  # "auto" on CPU: experts on worker threads (benchmarks/moe_layer.py)


def _modes_active() -> bool:
    """A dispatch or function mode (FlopCounterMode, fake tensors, ...) or a tracer is active:
    these are thread-local, so worker threads would escape them."""
    return bool(
        torch._C._len_torch_dispatch_stack()
        or torch._C._len_torch_function_stack()
        or torch.jit.is_tracing()
    )


def expert_weights(num_experts: int, rows: int, cols: int, **kw) -> torch.Tensor:
    """Uninitialised (E, rows, cols) expert weights, each expert's matrix stored transposed
    (strides (rows * cols, 1, rows), nn.Linear's (out, in) order in memory): the operand layout
    oneDNN's products take, and small forward-only products read it in place
    (moesaic/experts/gemm.py). Any layout computes the same."""
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
        impl: "loop" runs one matmul per expert on its slice, each kernel on all intra-op
            threads; "threads" runs the same per-expert kernels single-threaded, whole experts
            split across ``torch.get_num_threads()`` worker threads (CPU); "grouped" one
            ``torch._grouped_mm`` per projection; "auto" takes grouped for bf16 on CUDA, threads
            on a multi-threaded CPU and the loop otherwise (measured in benchmarks/).
        gemm: the loop's matrix products on CPU: "auto" runs fp32 ones on oneDNN (about twice
            torch.mm's speed on the AVX-512 AMD machines measured, with the activation fused;
            moesaic/experts/gemm.py) when d_model * d_ff >= 262144 (smaller ones measured
            slower there), and bf16 ones on torch.mm (which calls oneDNN's matmul itself and
            measured faster); "onednn" takes oneDNN for bf16 and small experts too; "torch"
            always torch.mm. Other devices, and products with fewer than 4 rows, always use
            torch.

    Shape:
        forward(x_AD, counts): x (A, D) grouped by expert with ``counts[e]`` rows for expert e,
        sum(counts) == A. Output (A, D).

    Parameters ``w1`` (E, D, F), ``w2`` (E, F, D) and for swiglu ``w3`` (E, D, F) are public names,
    as are ``b1``, ``b2``, ``b3`` (None without ``bias``). Each expert's weight matrix is stored
    transposed (``expert_weights``: ``w1`` has strides (D * F, 1, D)), the layout the CPU
    products read fastest; ``.contiguous()`` copies compute the same, only slower.
    """

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        d_ff: int,
        activation: str = "gelu",
        *,
        bias: bool = False,
        impl: str = "auto",
        gemm: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("num_experts", num_experts), ("d_model", d_model), ("d_ff", d_ff)):
            check_positive_int(name, value)
        check_choice("activation", activation, ACTIVATIONS)
        check_choice("impl", impl, IMPLS)
        check_choice("gemm", gemm, BACKENDS)
        self.num_experts, self.d_model, self.d_ff = num_experts, d_model, d_ff
        self.activation, self.impl, self.gemm = activation, impl, gemm
        self.act = ACTIVATIONS[activation]
        kw = {"device": device, "dtype": dtype}
        self.w1 = nn.Parameter(expert_weights(num_experts, d_model, d_ff, **kw))
        self.w2 = nn.Parameter(expert_weights(num_experts, d_ff, d_model, **kw))
        self.w3 = (
            nn.Parameter(expert_weights(num_experts, d_model, d_ff, **kw)) if self.gated else None
        )
        if not isinstance(bias, bool):
            raise TypeError(f"bias={bias!r} must be a bool")
        self.b1 = nn.Parameter(torch.empty(num_experts, d_ff, **kw)) if bias else None
        self.b2 = nn.Parameter(torch.empty(num_experts, d_model, **kw)) if bias else None
        self.b3 = (
            nn.Parameter(torch.empty(num_experts, d_ff, **kw)) if bias and self.gated else None
        )
        self.reset_parameters()
        self.grad_pool = GradPool()
        self.packs: PackCache | None = None

    def pack_for_inference(self, rows_hint: int = 64) -> Experts:
        """Keep the weights also in oneDNN's packed layout for forward-only calls on CPU in fp32
        or bf16 (inference mode, no_grad, or frozen weights), so the products skip repacking
        each expert's weights on every call (bf16 products then run on oneDNN too). Costs a
        second copy of w1, w2 (and w3); the copy is rebuilt after the weights change. Training
        calls are unaffected. ``rows_hint`` is the typical rows per expert. ``unpack()`` drops
        the copy."""
        check_positive_int("rows_hint", rows_hint)
        w = self.w1
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
        if not packable(self.gemm, w, self.d_model * self.d_ff):
            raise ValueError(
                f"pack_for_inference: these experts run on torch.mm (gemm={self.gemm!r}, "
                f"d_model * d_ff = {self.d_model * self.d_ff} < {MIN_WEIGHT} under 'auto'), "
                "so a packed copy would not be used; build them with gemm='onednn' to force it"
            )
        self.packs = PackCache(rows_hint)
        self.packs.get(self.w1, self.w2, self.w3)
        return self

    def unpack(self) -> Experts:
        """Drop the packed copy made by ``pack_for_inference``."""
        self.packs = None
        return self

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
        return (
            f"num_experts={self.num_experts}, d_model={self.d_model}, d_ff={self.d_ff}, "
            f"activation={self.activation!r}, bias={self.b1 is not None}, impl={self.impl!r}, "
            f"gemm={self.gemm!r}"
        )

    def forward(
        self,
        x_AD: torch.Tensor,
        counts: list[int],
        *,
        sink: ScatterCombine | None = None,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Expert e's FFN on rows ``sum(counts[:e]) .. sum(counts[:e + 1])`` of ``x_AD`` (A, D).

        With ``rows`` (LongTensor (A,)), ``x_AD`` is any (N, D) tensor and the inputs are its rows
        ``x_AD[rows]``: forward-only calls on the expert loop then gather each expert's rows
        just before its products instead of copying all A rows first (no (A, D) input copy);
        otherwise the gather runs first (differentiably). With ``sink`` (forward-only calls;
        moesaic/experts/dispatch.py) each expert's output rows go to ``sink`` as they are made
        and the result is ``sink.result()``, the combined (T, D) output, instead of (A, D).
        """
        self._check(x_AD, counts, rows)
        recording = records_autograd(x_AD, *self.parameters())
        if sink is not None and recording:
            raise ValueError("Experts: sink= is for forward-only calls (autograd is recording)")
        grouped = self._use_grouped(x_AD)
        if rows is not None and (recording or grouped):
            x_AD, rows = x_AD.index_select(0, rows), None
        if grouped:
            y_AD = self._grouped(x_AD, counts)
            if sink is None:
                return y_AD
            sink(slice(0, y_AD.shape[0]), y_AD)
        else:
            y_AD = self._loop(x_AD, counts, sink, rows)
        return y_AD if sink is None else sink.result()

    def _check(self, x_AD: torch.Tensor, counts: list[int], rows: torch.Tensor | None) -> None:
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
        inputs = ("x_AD", x_AD)
        if rows is not None:
            if not isinstance(rows, torch.Tensor) or rows.dtype != torch.long or rows.dim() != 1:
                what = (
                    f"{rows.dtype} {tuple(rows.shape)}" if isinstance(rows, torch.Tensor) else rows
                )
                raise TypeError(f"rows={what!r} must be a 1-D LongTensor (row of x_AD per input)")
            if rows.device != x_AD.device:
                raise ValueError(f"rows.device={rows.device} must match x_AD.device={x_AD.device}")
            inputs = ("rows", rows)
        name, t = inputs
        if sum(counts) != t.shape[0]:
            raise ValueError(f"sum(counts)={sum(counts)} must equal {name}.shape[0]={t.shape[0]}")

    def _use_grouped(self, x_AD: torch.Tensor) -> bool:
        if self.impl != "auto":
            return self.impl == "grouped"
        # torch._grouped_mm's fast path: CUDA, bf16 operands, rows 16-byte aligned
        return (
            x_AD.is_cuda
            and hasattr(torch, "_grouped_mm")
            and x_AD.dtype == self.w1.dtype == torch.bfloat16
            and self.d_model % 8 == 0
            and self.d_ff % 8 == 0
        )

    @torch.compiler.disable  # worker threads, a hand-written autograd Function: run eagerly
    def _loop(
        self, x_AD: torch.Tensor, counts: list[int], sink=None, rows=None
    ) -> torch.Tensor | None:
        w1, w2, w3, biases = self.w1, self.w2, self.w3, self.biases
        if self.grad_pool is not None and torch.is_grad_enabled():
            for w in (w1, w2, w3):
                if w is not None:
                    self.grad_pool.watch(w)
        if torch.is_autocast_enabled(x_AD.device.type):
            # the Function's matmuls would each be autocast; cast once here instead
            dtype = torch.get_autocast_dtype(x_AD.device.type)
            x_AD, w1, w2 = x_AD.to(dtype), w1.to(dtype), w2.to(dtype)
            w3 = w3.to(dtype) if w3 is not None else None
            biases = tuple(b.to(dtype) if b is not None else None for b in biases)
        size = self.d_model * self.d_ff
        modes = _modes_active()
        onednn = use_onednn(self.gemm, x_AD, size) and not modes
        packs = self.packs
        if packs is not None and (
            modes or x_AD.dtype != self.w1.dtype or not packable(self.gemm, x_AD, size)
        ):
            packs = None  # (under autocast the cast weights are new tensors every call)
        with torch.autocast(x_AD.device.type, enabled=False):
            return sliced_ffn(
                x_AD,
                w1,
                w2,
                w3,
                counts,
                self.activation,
                self.grad_pool,
                biases=biases,
                threads=self._threads(x_AD),
                onednn=onednn,
                packs=packs,
                sink=sink,
                rows=rows,
            )

    def _threads(self, x_AD: torch.Tensor) -> int:
        """Worker threads for whole experts (1: the plain loop on intra-op threads)."""
        use = self.impl == "threads" or (self.impl == "auto" and AUTO_THREADS)
        if not use or x_AD.device.type != "cpu" or _modes_active():
            return 1
        return torch.get_num_threads()

    def _grouped(self, x_AD: torch.Tensor, counts: list[int]) -> torch.Tensor:
        counts_E = torch.tensor(counts, device=x_AD.device)
        offs = counts_E.cumsum(0).to(torch.int32)
        # expert of each row, only to index the biases
        expert_A = torch.repeat_interleave(torch.arange(len(counts), device=x_AD.device), counts_E)

        def linear(x, w, b):
            y = torch._grouped_mm(x, w, offs=offs)
            return y if b is None else y + b[expert_A]

        h = self.act(linear(x_AD, self.w1, self.b1))
        if self.w3 is not None:
            h = h * linear(x_AD, self.w3, self.b3)
        return linear(h, self.w2, self.b2)
