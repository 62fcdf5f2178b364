"""int8 expert products on CPU: three kernels behind one interface, and the rule that picks one.

Each kernel multiplies activations x (M, K) by an int8 weight q (N, K) with one fp32 scale per
output row, ``w ~= q * s[:, None]``, plus an optional bias:

- ``"dynamic"``: torch's dynamic quantised linear (``torch.ops.quantized.linear_prepack`` /
  ``linear_dynamic``, the fbgemm or "x86" engine). Each call quantises x to uint8 (one scale and
  zero point for the tensor, its range widened to hold 0), multiplies in integers and
  accumulates in int32 (``vpmaddubsw`` on AVX2, ``vpdpbusd`` where the CPU has AVX-512 VNNI or
  AVX-VNNI), then rescales to fp32. Without VNNI, ``vpmaddubsw`` adds pairs of u8 x s8 products
  into int16, which can saturate; ``reduce_range`` keeps activations to 7 bits there.
- ``"int8pack"``: weight-only, ``torch._weight_int8pack_mm`` (x stays in float).
- ``"dequantise"``: the plain reference: dequantise the weight, then ``F.linear``.

The default is chosen once per process from what the running CPU and torch build have, found
by probing, never by assuming an instruction set (``engine_kernel()``): ``"dynamic"`` where an
x86 fbgemm engine is present, torch dispatches to AVX2 or AVX-512, and a probe product agrees
with the reference; otherwise ``"dequantise"`` (int8 then saves memory, not time). Then by size
(``int8_kernel(weights)``): the dynamic kernel pays a fixed cost per call (quantising x,
rescaling y), so it beats the fp32 product only from about ``DYNAMIC_MIN_WEIGHTS`` weights per
matrix up; smaller matrices take ``"dequantise"``. ``"int8pack"`` is never the default: it was
slower than fp32 products from a few rows on, on both CPUs measured. The measurements behind
both choices are in docs/serving.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import platform
import warnings
from collections.abc import Callable
from typing import ClassVar

import torch
from torch.nn import functional as F

__all__ = [
    "Int8Kernel",
    "Dequantise",
    "Int8Pack",
    "DynamicQuant",
    "KERNELS",
    "choose_kernel",
    "has_vnni",
    "int8_kernel",
    "engine_kernel",
    "DYNAMIC_MIN_WEIGHTS",
]

Packed = tuple  # what a kernel's ``pack`` returns; only its own ``linear`` reads it


@dataclasses.dataclass(frozen=True)
class Int8Kernel:
    """``pack`` a quantised weight once, then ``linear`` many times; ``why`` says how the kernel
    was chosen (empty when named by the caller)."""

    name: ClassVar[str] = ""
    why: str = ""

    def pack(self, q_NK: torch.Tensor, s_N: torch.Tensor, b_N: torch.Tensor | None) -> Packed:
        return (q_NK, s_N, b_N)

    def linear(self, x_MK: torch.Tensor, packed: Packed) -> torch.Tensor:
        q_NK, s_N, b_N = packed
        w_NK = (q_NK.to(s_N.dtype) * s_N[:, None]).to(x_MK.dtype)
        return F.linear(x_MK, w_NK, None if b_N is None else b_N.to(x_MK.dtype))

    def describe(self) -> str:
        return self.name + (f" ({self.why})" if self.why else "")


@dataclasses.dataclass(frozen=True)
class Dequantise(Int8Kernel):
    name: ClassVar[str] = "dequantise"


@dataclasses.dataclass(frozen=True)
class Int8Pack(Int8Kernel):
    name: ClassVar[str] = "int8pack"

    def linear(self, x_MK: torch.Tensor, packed: Packed) -> torch.Tensor:
        if x_MK.dtype != torch.float32:
            return super().linear(x_MK, packed)
        q_NK, s_N, b_N = packed
        y = torch._weight_int8pack_mm(x_MK.contiguous(), q_NK, s_N)
        return y if b_N is None else y + b_N


@dataclasses.dataclass(frozen=True)
class DynamicQuant(Int8Kernel):
    """``engine``: the quantised engine the weight is packed for; ``reduce_range``: 7-bit
    activations (for CPUs without VNNI, see the module docstring)."""

    name: ClassVar[str] = "dynamic"
    engine: str = "x86"
    reduce_range: bool = True

    def pack(self, q_NK: torch.Tensor, s_N: torch.Tensor, b_N: torch.Tensor | None) -> Packed:
        zero_N = torch.zeros(q_NK.shape[0], dtype=torch.long)
        with _engine(self.engine), warnings.catch_warnings():
            # torch 2.13 marks quantised tensors deprecated; the packed weight is the supported
            # input of linear_dynamic
            warnings.simplefilter("ignore", UserWarning)
            qw = torch._make_per_channel_quantized_tensor(q_NK, s_N.double(), zero_N, 0)
            b = None if b_N is None else b_N.float().contiguous()
            return (torch.ops.quantized.linear_prepack(qw, b), super().pack(q_NK, s_N, b_N))

    def linear(self, x_MK: torch.Tensor, packed: Packed) -> torch.Tensor:
        handle, plain = packed
        if x_MK.dtype != torch.float32:
            return super().linear(x_MK, plain)
        return torch.ops.quantized.linear_dynamic(x_MK.contiguous(), handle, self.reduce_range)


KERNELS: dict[str, type[Int8Kernel]] = {k.name: k for k in (Dequantise, Int8Pack, DynamicQuant)}


@contextlib.contextmanager
def _engine(name: str):
    before = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = before


def _agrees(kernel: Int8Kernel, tol: float) -> bool:
    """A small product on ``kernel`` against the dequantised reference (relative to the
    output's largest magnitude); False when it raises."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (24, 64), generator=gen, dtype=torch.int8)
    s, x = torch.rand(24, generator=gen) / 100 + 1e-3, torch.randn(5, 64, generator=gen)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = kernel.linear(x, kernel.pack(q, s, None))
    except (RuntimeError, NotImplementedError, AttributeError):
        return False
    want = Dequantise().linear(x, (q, s, None))
    return bool((got - want).abs().max() <= tol * want.abs().max())


def has_vnni(flags: dict) -> bool:
    """The CPU multiplies u8 x s8 into int32 in one instruction (AVX-512 VNNI or AVX-VNNI)."""
    return bool(flags.get("avx512_vnni") or flags.get("avx_vnni"))


def choose_kernel(
    arch: str, isa: str, engines: list[str], flags: dict, agrees: Callable[[Int8Kernel], bool]
) -> Int8Kernel:
    """The rule: ``"dynamic"`` on an x86 CPU where torch dispatches to AVX2 or AVX-512, an
    fbgemm engine ("x86" or "fbgemm") is built in and ``agrees`` (a probe product) passes, with
    8-bit activations only where the CPU has VNNI; else ``"dequantise"``, saying why."""
    if arch.lower() not in ("x86_64", "amd64"):
        return Dequantise(why=f"{arch}: no measured int8 engine")
    engine = next((e for e in ("x86", "fbgemm") if e in engines), None)
    if engine is None or isa not in ("AVX2", "AVX512"):
        return Dequantise(why=f"no fbgemm engine for {isa} among {list(engines)}")
    vnni = has_vnni(flags)
    kernel = DynamicQuant(
        engine=engine,
        reduce_range=not vnni,
        why=f"{engine} engine, {isa}, {'VNNI' if vnni else 'no VNNI: 7-bit activations'}",
    )
    if not agrees(kernel):
        return Dequantise(why=f"the {engine} engine's probe product failed or disagreed")
    return kernel


DYNAMIC_MIN_WEIGHTS = 1 << 18  # N * K from which "dynamic" beats fp32 (module docstring)


def int8_kernel(weights: int | None = None) -> Int8Kernel:
    """The default int8 kernel for matrices of ``weights`` = N * K weights (None: any size):
    the engine's kernel (``engine_kernel()``) where it is faster than fp32 at that size, else
    ``"dequantise"``, saying why."""
    kernel = engine_kernel()
    if kernel.name == "dynamic" and weights is not None and weights < DYNAMIC_MIN_WEIGHTS:
        return Dequantise(
            why=f"{weights:,} weights per matrix < {DYNAMIC_MIN_WEIGHTS:,}: fp32 products are "
            "faster there"
        )
    return kernel


@functools.cache
def engine_kernel() -> Int8Kernel:
    """This process's int8 engine kernel (``choose_kernel`` on the running CPU and torch)."""
    get = getattr(torch.cpu, "get_capabilities", None)
    try:  # older torch builds have neither, or raise on an unknown CPU
        isa, flags = torch.backends.cpu.get_cpu_capability(), (get() if get else {})
    except (AttributeError, RuntimeError):
        isa, flags = "unknown", {}
    return choose_kernel(
        platform.machine(),
        isa,
        torch.backends.quantized.supported_engines,
        flags,
        functools.partial(_agrees, tol=0.05),
    )
