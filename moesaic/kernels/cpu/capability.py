"""What the running CPU and torch build can do, found once per process by trying it.

CPUs differ (AVX2 only, AVX-512, AMX, ARM) and so do torch builds (with or without oneDNN).
Reading instruction-set flags is not enough: whether oneDNN's fused linear runs in bf16 depends
on the CPU (it needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT on x86) *and* on the oneDNN inside the
torch wheel. So every fast path is decided by a probe: a tiny product run on that path and
compared with ``F.linear``. A path that raises or disagrees is off, and the portable path
(``torch.mm``) runs instead. The flags torch reports are kept for messages and reports.
"""

from __future__ import annotations

import dataclasses
import functools
import platform

import torch
from torch.nn import functional as F
from torch.utils import _python_dispatch

__all__ = ["CpuCapability", "cpu_capability"]


@dataclasses.dataclass(frozen=True)
class CpuCapability:
    """The running CPU and what moesaic's CPU kernels may use on it.

    Attributes:
        name: the CPU's model name (as torch reads it), or the platform's processor string.
        vendor: "AMD", "Intel" or "other": which BLAS paths suit the CPU depends on it (MKL,
            behind torch.mm on x86 wheels, runs its AVX-512 kernels on Intel CPUs only).
        arch: ``platform.machine()`` (x86_64, aarch64, ...).
        isa: the vector instruction set torch's own kernels dispatch to (``AVX2``, ``AVX512``,
            ``SVE256``, ``DEFAULT``, ...).
        flags: the CPU features torch reports as present (``avx512_bw``, ``amx_bf16``, ...).
        onednn_fp32: oneDNN's fused linear (with GELU / ReLU / SiLU and the binary mul / add)
            runs in fp32 and matches ``F.linear``.
        onednn_bf16: the same in bf16, and oneDNN's weight packing for bf16 works.
    """

    name: str
    vendor: str
    arch: str
    isa: str
    flags: tuple[str, ...]
    onednn_fp32: bool
    onednn_bf16: bool

    def describe(self) -> str:
        """One line for logs and benchmark reports."""
        paths = ", ".join(
            f"oneDNN {dtype} {'yes' if ok else 'no'}"
            for dtype, ok in (("fp32", self.onednn_fp32), ("bf16", self.onednn_bf16))
        )
        return f"{self.name} ({self.arch}, {self.isa}; {paths})"


def _torch_flags() -> tuple[str, dict]:
    get = getattr(torch.cpu, "get_capabilities", None)
    try:
        caps = get() if get is not None else {}
    except RuntimeError:
        caps = {}
    return str(caps.get("cpu_name") or platform.processor() or "unknown CPU"), caps


def _vendor_id() -> str:
    """The kernel's ``vendor_id`` line on Linux ("GenuineIntel", "AuthenticAMD"), else ""."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            return next((line for line in f if line.startswith("vendor_id")), "")
    except OSError:
        return ""


def _vendor(name: str, vendor_id: str, processor: str, arch: str = "x86_64") -> str:
    """ "AMD", "Intel" or "other", from torch's model name ("AMD EPYC 9B14", "Intel Xeon"), the
    kernel's ``vendor_id`` and the platform's processor string (Windows names the vendor there:
    "AMD64 Family 25 Model 17 Stepping 1, AuthenticAMD"). Only x86 CPUs have either vendor (an
    emulated ARM process reads its x86 host's ``/proc/cpuinfo``)."""
    if arch.lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return "other"
    text = f"{name} {vendor_id} {processor}"
    if "AuthenticAMD" in text or name.startswith("AMD"):
        return "AMD"
    if "GenuineIntel" in text or "Intel" in name:
        return "Intel"
    return "other"


def _probe(dtype: torch.dtype) -> bool:
    """Run every oneDNN op the CPU kernels use on a small product in ``dtype``; True when all
    run and agree with ``F.linear``."""
    ops = getattr(torch.ops, "mkldnn", None)
    if not torch.backends.mkldnn.is_available() or not hasattr(ops, "_linear_pointwise"):
        return False
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(8, 32, generator=gen).to(dtype)
    w = torch.randn(48, 32, generator=gen).to(dtype)  # (N, K): nn.Linear's layout
    other = torch.randn(8, 48, generator=gen).to(dtype)
    want = F.linear(a.float(), w.float())
    tol = {"rtol": 2e-2, "atol": 5e-2} if dtype == torch.bfloat16 else {"rtol": 1e-4, "atol": 1e-4}
    try:
        checks = [
            (ops._linear_pointwise(a, w, None, "none", [], None), want),
            (ops._linear_pointwise(a, w, None, "gelu", [], "none"), F.gelu(want)),
            (ops._linear_pointwise.binary(a, other, w, None, "mul"), want * other.float()),
            (ops._linear_pointwise.binary(a, other, w, None, "add"), want + other.float()),
        ]
        packed = ops._reorder_linear_weight(w, 8)
        checks.append((ops._linear_pointwise(a, packed, None, "none", [], None), want))
        return all(torch.allclose(got.float(), ref, **tol) for got, ref in checks)
    except (RuntimeError, TypeError, NotImplementedError):
        return False


@functools.cache
def cpu_capability() -> CpuCapability:
    """The running CPU's capability (probed once per process)."""
    name, caps = _torch_flags()
    try:
        isa = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        isa = "unknown"
    flags = tuple(sorted(k for k, v in caps.items() if v is True))
    # The probe's products are not the caller's work: when the first MoE forward of a process
    # runs under a dispatch mode (FlopCounterMode in ms.metrics.measure_flops), keep them out.
    with _python_dispatch._disable_current_modes():
        fp32 = _probe(torch.float32)
        bf16 = fp32 and _probe(torch.bfloat16)
    return CpuCapability(
        name=name,
        vendor=_vendor(name, _vendor_id(), platform.processor(), platform.machine()),
        arch=platform.machine(),
        isa=isa,
        flags=flags,
        onednn_fp32=fp32,
        onednn_bf16=bf16,
    )
