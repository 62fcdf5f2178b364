"""Every tuning number of the CPU kernels, in one frozen dataclass.

Each default was measured side by side on the machines listed in docs/performance.md ("CPU
kernel tuning"), where the numbers and the commands that reproduce them live. To try other
values, build the backend with them: ``CpuBackend(CpuTuning(workers="loop"))``; nothing here is
a mutable module global.
"""

from __future__ import annotations

import dataclasses

__all__ = ["CpuTuning", "DEFAULT_TUNING"]

GEMMS = ("auto", "onednn", "torch")
WORKERS = ("auto", "threads", "loop")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CpuTuning:
    """Choices of the CPU backend ("cpu").

    Attributes:
        gemm: the experts' matrix products: "auto" runs fp32 products on oneDNN where that was
            measured faster for training steps (``auto_onednn_isas`` on a vendor in
            ``auto_onednn_vendors``, experts of at least ``min_weight`` weights per projection)
            and bf16 on torch.mm (which calls oneDNN's matmul itself); "onednn" takes oneDNN for
            every dtype and size it runs; "torch" always torch.mm. Products with fewer than
            ``min_rows`` rows stay on torch.mm.
        workers: "threads" runs whole experts on worker threads with single-threaded kernels;
            "loop" runs the experts in order, each kernel on all intra-op threads; "auto" takes
            threads except where ``loop_rows`` / ``loop_max_total`` / ``max_imbalance`` say the
            loop wins (``moesaic.kernels.cpu.threads.expert_order``).
        min_rows: products with fewer rows run on torch.mm (oneDNN repacks the weight per call).
        min_weight: under gemm="auto", experts with fewer weights per projection (D * F) stay on
            torch.mm (oneDNN's per-shape kernel compilation is never won back on small ones).
        auto_onednn_isas, auto_onednn_vendors: instruction sets (torch's
            ``get_cpu_capability()``) and CPU vendors (``CpuCapability.vendor``) where gemm="auto"
            uses oneDNN for fp32: both must match.
        swap_rows, swap_block, swap_pad: forward-only fp32 oneDNN products with rows in
            ``swap_rows`` (inclusive) and at most ``swap_pad`` rows short of a multiple of
            ``swap_block`` run as ``(w^T x^T)^T``, the weight read in place as the left operand.
        gate_min_rows, gate_vendors: routers' gate products run on oneDNN in fp32 from this many
            tokens, on CPUs of a vendor in ``gate_vendors`` (torch.mm measured faster on Intel).
        loop_rows, loop_max_total, loop_vendors, loop_small: under workers="auto", a mean of
            rows per expert strictly inside ``loop_rows`` on at most ``loop_max_total`` rows runs
            the loop on CPUs of a vendor in ``loop_vendors``, and on every CPU for experts with
            fewer than ``loop_small`` weights per projection (D * F).
        max_imbalance: the busiest worker's rows over the even share beyond which the loop runs.
        release_openmp: release the caller's idle OpenMP team before the worker threads start.
        shared_block: a 1-expert module (the shared expert) runs inputs of more than twice this
            many rows in blocks of this many, keeping its temporaries in cache.
        recycle_grads: hand last step's expert-weight gradient memory out again when nothing
            else holds it (moesaic/kernels/cpu/gradpool.py).
    """

    gemm: str = "auto"
    workers: str = "auto"
    min_rows: int = 4
    min_weight: int = 256 * 1024
    auto_onednn_isas: tuple[str, ...] = ("AVX512",)
    auto_onednn_vendors: tuple[str, ...] = ("AMD",)
    swap_rows: tuple[int, int] = (16, 128)
    swap_block: int = 16
    swap_pad: int = 2
    gate_min_rows: int = 512
    gate_vendors: tuple[str, ...] = ("AMD", "other")
    loop_rows: tuple[int, int] = (128, 1024)
    loop_max_total: int = 8192
    loop_vendors: tuple[str, ...] = ("AMD", "other")
    loop_small: int = 65536
    max_imbalance: float = 1.25
    release_openmp: bool = True
    shared_block: int = 1024
    recycle_grads: bool = True

    def __post_init__(self) -> None:
        for name, choices in (("gemm", GEMMS), ("workers", WORKERS)):
            if getattr(self, name) not in choices:
                raise ValueError(
                    f"CpuTuning.{name}={getattr(self, name)!r} is not one of {choices}"
                )
        ints = (
            "min_rows",
            "min_weight",
            "swap_block",
            "gate_min_rows",
            "shared_block",
            "loop_small",
        )
        for name in ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"CpuTuning.{name}={value!r} must be an int >= 1")
        if self.swap_pad < 0:
            raise ValueError(f"CpuTuning.swap_pad={self.swap_pad!r} must be >= 0")
        for name in ("swap_rows", "loop_rows"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ValueError(f"CpuTuning.{name}={(lo, hi)!r} must be (lo, hi), 0 <= lo <= hi")
        if not self.max_imbalance >= 1:
            raise ValueError(f"CpuTuning.max_imbalance={self.max_imbalance!r} must be >= 1")


DEFAULT_TUNING = CpuTuning()
