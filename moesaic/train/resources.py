"""Does a run fit this machine? A lower bound on its memory, checked before any work.

A configuration can be valid field by field and still impossible here (``data.batch_size=1e9``,
``model.moe.num_experts=1e8``): without a check it dies minutes later in a ``MemoryError``
traceback.
``check_resources`` counts the model's parameters exactly on the ``meta`` device (no memory
used), adds what training needs at the least, and refuses with the numbers when that exceeds the
memory available. The estimate is a lower bound on purpose: it never refuses a run that would
fit, only runs that cannot.

At the least, training holds per parameter its fp32 value, gradient and AdamW's two moments
(16 bytes); per batch the fp32 logits and their gradient (2 x B x S x V x 4 bytes) and each
layer's fp32 input kept for the backward pass (L x B x S x D x 4 bytes); and the fixed validation
batches (``eval_batches`` x B x S tokens, inputs and targets, int64).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

__all__ = [
    "Needs",
    "estimate_needs",
    "available_memory",
    "check_resources",
    "ResourceError",
    "busy_cores_warning",
]

GIB = 1024**3


class ResourceError(ValueError):
    """The run cannot fit this machine; the message gives the numbers and the fields to change."""


@dataclasses.dataclass(frozen=True)
class Needs:
    parameters: int
    model_bytes: int  # parameters, gradients, AdamW moments and buffers
    batch_bytes: int  # one training batch's activations, at the least
    eval_bytes: int  # the fixed validation batches

    @property
    def total_bytes(self) -> int:
        return self.model_bytes + self.batch_bytes + self.eval_bytes


def _count_on_meta(model_cfg) -> tuple[int, int]:
    """(parameters, buffer elements) of ``MoELM(model_cfg)``, counted without memory: blocks of
    each kind are built once on the meta device and multiplied, so a config with 10^5 layers is
    counted as fast as one with 2."""
    from moesaic.models.lm import MoELM

    def kind(cfg, i: int) -> tuple[bool, int, int]:  # a layer's parameters depend on these
        return cfg.moe_layer(i), cfg.ffn_width(i), cfg.layer_experts(i)

    # Past the first dense layers, layer i's kind depends on (i + 1) % moe_every only: one
    # dense layer (if any) and moe_every more layers hold every kind.
    first = min(model_cfg.first_dense_layers, 1)
    probe_cfg = model_cfg  # pyramid (moe_experts): a list of n_layers counts, probe them all
    if model_cfg.moe_experts is None:
        probe_cfg = dataclasses.replace(
            model_cfg,
            n_layers=min(model_cfg.n_layers, first + model_cfg.moe_every),
            first_dense_layers=first,
        )
    with torch.device("meta"):
        probe = MoELM(probe_cfg)
    per_kind = {
        kind(probe_cfg, i): sum(p.numel() for p in b.parameters())
        for i, b in enumerate(probe.blocks)
    }
    in_blocks = sum(p.numel() for b in probe.blocks for p in b.parameters())
    outside = sum(p.numel() for p in probe.parameters()) - in_blocks
    params = outside + sum(per_kind[kind(model_cfg, i)] for i in range(model_cfg.n_layers))
    buffers = sum(b.numel() for b in probe.buffers())
    return params, buffers


def estimate_needs(cfg) -> Needs:
    """The lower bound for ``cfg`` (a ``RunConfig``), vocabulary from its tokenizer settings."""
    vocab = cfg.data.bpe_vocab_size if cfg.data.tokenizer == "bpe" else cfg.model.vocab_size
    model_cfg = dataclasses.replace(cfg.model, vocab_size=max(vocab, 1))
    params, buffers = _count_on_meta(model_cfg)
    tokens = cfg.data.batch_size * cfg.data.seq_len
    batch = 4 * tokens * (2 * model_cfg.vocab_size + model_cfg.n_layers * model_cfg.d_model)
    evals = 2 * 8 * cfg.data.eval_batches * tokens
    return Needs(params, 16 * params + 4 * buffers, batch, evals)


def available_memory() -> int | None:
    """Bytes this process can still allocate: the smaller of the kernel's MemAvailable and the
    cgroup's remaining limit (containers); None where neither can be read."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            found.append(int(limit) - used)
    except (OSError, ValueError):
        pass
    if not found:
        try:
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            return None
    return max(0, min(found))


def check_resources(cfg, available: int | None = None) -> Needs:
    """Raise ``ResourceError`` when ``cfg`` cannot fit: more threads than CPUs, or more memory
    than is available (``available`` bytes, default ``available_memory()``)."""
    cpus = os.cpu_count() or 1
    if cfg.train.threads > cpus:
        raise ResourceError(
            f"train.threads={cfg.train.threads} must be <= {cpus}, the CPUs of this machine "
            f"(0 lets torch choose)"
        )
    needs = estimate_needs(cfg)
    available = available_memory() if available is None else available
    if available is not None and needs.total_bytes > available:
        experts = cfg.model.moe.num_experts if cfg.model.is_moe else 0
        raise ResourceError(
            f"the run needs at least {needs.total_bytes / GIB:.1f} GiB of memory and "
            f"{available / GIB:.1f} GiB is available: the model's {needs.parameters:,} "
            f"parameters with gradients and AdamW state take {needs.model_bytes / GIB:.1f} GiB "
            f"(model.d_model={cfg.model.d_model}, n_layers={cfg.model.n_layers}, "
            f"d_ff={cfg.model.d_ff}, moe.num_experts={experts}), one batch "
            f"{needs.batch_bytes / GIB:.1f} GiB (data.batch_size={cfg.data.batch_size} x "
            f"seq_len={cfg.data.seq_len}), the validation batches {needs.eval_bytes / GIB:.1f} "
            f"GiB (data.eval_batches={cfg.data.eval_batches})"
        )
    return needs


def busy_cores_warning(threads: int, window_s: float = 0.1) -> str | None:
    """A one-line warning when other processes keep busy the cores a ``threads``-thread run
    needs, else None.

    Every parallel region of a multi-threaded step waits for its slowest thread, and a thread
    that shares its core with another process is descheduled for whole time slices: on a busy
    machine two threads can be many times slower than one (docs/reliability.md). The 1-minute
    load average is the cheap first look; when it says the cores may be busy, the machine's idle
    time is measured over ``window_s`` seconds while this process waits (Linux ``/proc/stat``),
    so this process's own recent work is not mistaken for another's. The thread count is not
    changed automatically: it also fixes the order of floating-point sums, so a resumed run must
    keep it to stay bit-identical.
    """
    if threads < 2 or not hasattr(os, "getloadavg"):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    load = os.getloadavg()[0]
    if threads <= cores - load + 0.5:
        return None
    idle = _idle_cores(window_s)
    if idle is not None and threads <= idle + 0.5:
        return None
    seen = f"{idle:.1f} idle" if idle is not None else f"load average {load:.1f}"
    return (
        f"{seen} on {cores} cores: other processes hold cores this run's {threads} threads "
        f"need, which can make each step several times slower than with fewer threads "
        f"(--set train.threads=1)"
    )


def _idle_cores(window_s: float) -> float | None:
    """Cores idle over the next ``window_s`` seconds by ``/proc/stat`` (None where unreadable)."""
    import time

    def sample() -> tuple[int, int] | None:
        try:
            fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        except OSError:
            return None
        ticks = [int(f) for f in fields[:8]]
        return ticks[3] + ticks[4], sum(ticks)  # idle + iowait, all

    first = sample()
    if first is None:
        return None
    time.sleep(window_s)
    second = sample()
    if second is None or second[1] == first[1]:
        return None
    share = (second[0] - first[0]) / (second[1] - first[1])
    return share * (os.cpu_count() or 1)
