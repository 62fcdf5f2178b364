"""Expert offloading (InfMoE, the toolkit of CPM-2, Zhang et al. 2021): experts live on disk and
only a budget's worth of them in memory.

``offload(model, budget_bytes=..., store=DIR)`` writes every MoE layer's experts to
``DIR/blocks.<i>.safetensors`` and replaces the layer's ``Experts`` with ``OffloadedExperts``:

- an expert is read (through a memory map of its file, whose pages are released right after the
  copy, so the mapping never holds more than the one expert being read) only when a token is
  routed to it: experts that get no token are never read (InfMoE skips empty experts too);
- a read goes into the buffers of an evicted expert of the same shapes once nothing uses them
  any more (fresh memory would have its pages faulted in and zeroed on every read);
- the experts read so far stay in one resident set shared by all layers, never more than
  ``budget_bytes`` of weights; to make room it evicts first the experts of the layer whose next
  turn is furthest away (the layers run in a cycle: the one that just ran), least recently used
  first among those;
- while layer l computes, a worker thread reads the experts layer l+1 used at the previous
  step (its routing is unknown until it runs; consecutive decoding steps tend to reuse experts),
  InfMoE's overlap of loading with compute. ``OffloadStats`` counts how often that guess was
  right.

A layer's read experts run together in one call of the layer's own expert backend (the plain
``"torch"`` loop, or the tuned CPU kernels the default picks), on the same weight matrices in the
same layout: where the experts a call needs fit in the budget together, the offloaded outputs
are bit-identical to the resident model's. Where they do not, they run in groups that fit, one
backend call each; the "torch" loop stays bit-identical, and a backend with a fused
experts-and-combine pass (the CPU one) then combines apart, equal within float rounding.

Shape legend (docs/shapes.md): A assignments grouped by expert, D model dim, F expert hidden.
"""

from __future__ import annotations

import dataclasses
import json
import mmap
import struct
import sys
import threading
import warnings
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from moesaic.experts import Experts
from moesaic.experts.backend import ExpertBackend
from moesaic.layer import MoE

__all__ = ["offload", "OffloadedExperts", "OffloadStats", "ExpertCache", "expert_nbytes"]

Key = tuple[int, int]  # (layer number among the MoE layers, expert)
Weights = tuple[torch.Tensor, ...]  # w1 (D, F), w2 (F, D)[, w3 (D, F)][, biases]
NAMES = ("w1", "w2", "w3", "b1", "b2", "b3")


def expert_nbytes(experts: Experts) -> int:
    """Bytes of one expert's weights (w1, w2, w3 and biases where present)."""
    total = 0
    for name in NAMES:
        w = getattr(experts, name)
        if w is not None:
            total += w[0].numel() * w.element_size()
    return total


@dataclasses.dataclass
class OffloadStats:
    """What the resident set did. ``prefetch_rate`` (``prefetch_hits / prefetch_needed``): of
    the experts a layer needed, the fraction its previous call's choices predicted (the guess the
    worker read ahead); ``hit_rate``: the fraction found resident or on its way."""

    reads: int = 0  # experts read from the store (sync and prefetch)
    read_bytes: int = 0
    hits: int = 0  # experts found resident when a layer needed them
    misses: int = 0  # experts read while the layer waited
    prefetched: int = 0  # experts the worker read ahead
    prefetch_needed: int = 0  # experts needed by layers that had a prefetch guess
    prefetch_hits: int = 0  # of those, in the guess
    evictions: int = 0
    reused: int = 0  # reads into an evicted expert's buffers (no fresh memory)
    peak_bytes: int = 0  # most weight bytes resident at once

    @property
    def hit_rate(self) -> float:
        return self.hits / max(1, self.hits + self.misses)

    @property
    def prefetch_rate(self) -> float:
        return self.prefetch_hits / max(1, self.prefetch_needed)


class _SafetensorsMap:
    """One safetensors file read through a memory map: ``read(name)`` copies a tensor out and
    releases the mapping's pages it touched (``madvise(MADV_DONTNEED)``), so only the copies
    count against memory."""

    def __init__(self, path: Path) -> None:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            self.header = json.loads(f.read(n))
            self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.base = 8 + n

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor ``name``, copied into ``out`` when given (a free buffer of the same shape
        and dtype: reusing it spares the page faults of fresh memory on every read)."""
        info = self.header[name]
        start, end = (self.base + o for o in info["data_offsets"])
        raw = np.frombuffer(self.map, dtype=np.uint8, count=end - start, offset=start)
        if out is None:
            out = torch.empty(info["shape"], dtype=getattr(torch, _DTYPES[info["dtype"]]))
        with warnings.catch_warnings():  # the map is read-only; it is only read from
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            src = torch.from_numpy(raw)
        # through torch, so the buffer's version counter moves (caches keyed on it)
        out.view(-1).view(torch.uint8).copy_(src)
        page = mmap.PAGESIZE
        lo = start // page * page
        self.map.madvise(mmap.MADV_DONTNEED, lo, end - lo)
        return out

    def close(self) -> None:
        self.map.close()


_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


class ExpertCache:
    """The resident set: experts by (layer, expert), least recently used first, at most
    ``budget_bytes`` of them, evicted by their layer's distance to its next turn; reads go
    through the layers' files; one worker thread reads ahead."""

    def __init__(self, files: list[Path], expert_bytes: list[int], budget_bytes: int) -> None:
        self.maps = [_SafetensorsMap(p) for p in files]
        self.shapes = [_expert_shapes(m.header) for m in self.maps]  # per layer, for reuse
        self.expert_bytes, self.budget = expert_bytes, budget_bytes
        self.resident: OrderedDict[Key, Weights] = OrderedDict()
        self.bytes = 0
        self.lock = threading.Lock()
        self.loading: dict[Key, Future] = {}
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moesaic-prefetch")
        self.stats = OffloadStats()
        self.last_used: dict[int, list[int]] = {}  # layer -> experts it needed last time
        self.guess: dict[int, set[int]] = {}  # layer -> experts read ahead for its next call
        self.pinned: set[Key] = set()  # the computing layer's experts still to run
        self.current: set[Key] = set()  # the experts computing now: never evicted
        self.layer_now = 0  # the layer computing now (evictions go by distance to next use)
        # evicted experts' buffers, refilled by later reads of a layer of the same shapes once
        # nothing else holds them (a computing layer may still use an evicted expert's tensors)
        self.spare: list[tuple[int, Weights]] = []

    def get(self, key: Key) -> Weights:
        """The expert's weights, read now if neither resident nor on its way."""
        with self.lock:
            if key in self.resident:
                self.resident.move_to_end(key)
                self.stats.hits += 1
                return self.resident[key]
            pending = self.loading.get(key)
        if pending is not None:
            pending.result()
            with self.lock:
                if key in self.resident:
                    self.stats.hits += 1
                    self.resident.move_to_end(key)
                    return self.resident[key]
        self.stats.misses += 1
        weights = self._read(key, sync=True)
        while weights is None:  # read-aheads in flight hold the room: let them land, retry
            with self.lock:
                pending = list(self.loading.values())
            for f in pending:
                f.result()
            weights = self._read(key, sync=True)
        return weights

    def prefetch(self, layer: int) -> None:
        """Read ahead, on the worker, the experts ``layer`` needed at its previous call."""
        guess = self.last_used.get(layer)
        if guess is None:
            return
        self.guess[layer] = set(guess)
        for e in guess:
            key = (layer, e)
            with self.lock:
                if key in self.resident or key in self.loading:
                    continue
                self.loading[key] = self.worker.submit(self._read, key, False)

    def begin(self, layer: int, keys: list[Key]) -> None:
        """``layer`` is about to compute ``keys``: read-aheads may not evict them."""
        with self.lock:
            self.pinned, self.layer_now = set(keys), layer

    def computing(self, keys: list[Key]) -> None:
        """``keys`` compute now (never evicted); []: they are done (any read may evict them)."""
        with self.lock:
            self.pinned.difference_update(self.current)
            self.current = set(keys)

    def _read(self, key: Key, sync: bool) -> Weights | None:
        """Read ``key`` into the resident set, evicting experts to make room (``_make_room``).
        A read ahead (``sync`` False) evicts only experts the computing layer does not need and
        gives up when that is not enough; a layer's own read may also evict its experts still
        to come (they are read again when their turn comes)."""
        layer, e = key
        size = self.expert_bytes[layer]
        with self.lock:
            if not self._make_room(size, sync):
                if not sync:
                    self.loading.pop(key, None)
                return None
            self.bytes += size  # reserved before reading, so the budget holds meanwhile
        names = [n for n in NAMES if f"{n}.{e}" in self.maps[layer].header]
        with self.lock:
            spare = self._spare_for(layer)
        if spare is None:
            weights = tuple(self.maps[layer].read(f"{n}.{e}") for n in names)
        else:
            weights = tuple(self.maps[layer].read(f"{n}.{e}", out) for n, out in zip(names, spare))
        with self.lock:
            self.resident[key] = weights
            self.loading.pop(key, None)
            self.stats.reads += 1
            self.stats.read_bytes += size
            self.stats.prefetched += not sync
            self.stats.peak_bytes = max(self.stats.peak_bytes, self.bytes)
        return weights

    def _spare_for(self, layer: int) -> Weights | None:
        """(lock held) An evicted expert's buffers that fit ``layer`` and nobody holds."""
        for i, (owner, weights) in enumerate(self.spare):
            if self.shapes[owner] == self.shapes[layer] and all(_unheld(t) for t in weights):
                self.stats.reused += 1
                return self.spare.pop(i)[1]
        del self.spare[: max(0, len(self.spare) - 8)]  # held for long: let them go
        return None

    def _make_room(self, size: int, sync: bool) -> bool:
        """(lock held) Evict until ``size`` more bytes fit; False when they cannot."""
        while self.bytes + size > self.budget:
            # the layers run in a cycle: the next use of a layer's experts is the furthest for the
            # layer that just ran, so evict by that distance (Belady's choice for a cycle), least
            # recently used first among equals; plain LRU would evict the next layer's experts
            free = sorted(
                (k for k in self.resident if k not in self.pinned),
                key=lambda k: -((k[0] - self.layer_now - 1) % len(self.maps)),
            )
            if not sync:  # a read-ahead never evicts the read-aheads of its own round
                free = [k for k in free if k[1] not in self.guess.get(k[0], ())]
            held = [k for k in self.resident if k in self.pinned and k not in self.current]
            victims = free + held if sync else free
            if not victims:
                return False
            self.bytes -= self.expert_bytes[victims[0][0]]
            self.spare.append((victims[0][0], self.resident.pop(victims[0])))
            self.stats.evictions += 1
        return True

    def record(self, layer: int, needed: list[int]) -> None:
        """Note what ``layer`` needed (the next call's guess) and score the last guess."""
        guess = self.guess.pop(layer, None)
        if guess is not None:
            self.stats.prefetch_needed += len(needed)
            self.stats.prefetch_hits += len(guess.intersection(needed))
        self.last_used[layer] = needed

    def close(self) -> None:
        self.worker.shutdown(wait=True)
        for m in self.maps:
            m.close()


class _ReadExperts:
    """One layer's experts as the expert backends take them (``Experts``' attributes), built
    from the weights read so far: ``w1[e]`` (D, F), ``w2[e]`` (F, D)[, ``w3[e]``][, biases
    ``b1[e]`` ...]; None for the experts not read (they get no rows in this call)."""

    training, dropout, packs = False, 0.0, None

    def __init__(self, like: OffloadedExperts, read: dict[int, dict[str, torch.Tensor]]):
        self.num_experts, self.d_model, self.d_ff = like.num_experts, like.d_model, like.d_ff
        self.activation, self.act, self.backend = like.activation, like.act, like.backend
        self.kernel_state = like.kernel_state
        for name in NAMES:
            if not like.has(name):
                setattr(self, name, None)
                continue
            t = name in like.transposed  # the (D, F) / (F, D) views Experts holds
            held = [read[e][name] if e in read else None for e in range(like.num_experts)]
            setattr(self, name, [w.t() if t and w is not None else w for w in held])

    @property
    def biases(self) -> tuple:
        return self.b1, self.b2, self.b3


class OffloadedExperts(nn.Module):
    """Stands in for a layer's ``Experts``: the same function, weights from an ``ExpertCache``.

    The experts a call needs are read into the resident set and run together, in one call of
    the layer's own expert backend (its threads over experts, its products), as many at a time
    as the budget holds: all of them when they fit, and then the call computes exactly what
    the resident layer computes, bit for bit. Forward-only (serving): it has no parameters.
    """

    def __init__(self, experts: Experts, cache: ExpertCache, layer: int, next_layer: int):
        super().__init__()
        self.num_experts, self.d_model, self.d_ff = (
            experts.num_experts,
            experts.d_model,
            experts.d_ff,
        )
        self.activation, self.act, self.gated = experts.activation, experts.act, experts.gated
        self.backend, self.has_bias = experts.backend, experts.b1 is not None
        self.kernel_state: dict[str, object] = {}
        self.transposed = _transposed(experts)  # the store's memory order (_expert_tensors)
        # the layer checks inputs against w1's device and dtype; no weights are kept here
        self.register_buffer("w1", torch.empty(0, dtype=experts.w1.dtype), persistent=False)
        self.cache, self.layer, self.next_layer = cache, layer, next_layer
        self.per_call = max(1, cache.budget // cache.expert_bytes[layer])  # experts at once

    @torch.no_grad()
    def forward_combined(self, x_TD: torch.Tensor, plan) -> torch.Tensor | None:
        """The backend's fused experts-and-combine pass, when it has one and the experts this
        call needs fit in the budget together; else None (the layer runs ``forward``)."""
        needed = [e for e, c in enumerate(plan.counts) if c]
        backend = Experts.backend_for(_ReadExperts(self, {}), x_TD)
        fused = type(backend).forward_combined is not ExpertBackend.forward_combined
        if not fused or len(needed) > self.per_call:
            return None
        self._begin(needed)
        experts = _ReadExperts(self, self._read(needed))
        y_TD = backend.forward_combined(experts, x_TD, plan)
        self._end(needed)
        return y_TD

    @torch.no_grad()
    def forward(self, x_AD: torch.Tensor, counts: list[int]) -> torch.Tensor:
        needed = [e for e, c in enumerate(counts) if c]  # no token: never read
        self._begin(needed)
        starts = [sum(counts[:e]) for e in range(len(counts) + 1)]
        y = []
        for i in range(0, len(needed), self.per_call):
            group = needed[i : i + self.per_call]  # consecutive experts: one slice of rows
            experts = _ReadExperts(self, self._read(group))
            sub = [c if e in group else 0 for e, c in enumerate(counts)]
            rows = x_AD[starts[group[0]] : starts[group[-1] + 1]]
            y.append(Experts.backend_for(experts, rows).forward(experts, rows, sub))
        self._end(needed)
        return torch.cat(y) if y else x_AD.new_empty(0, self.d_model)

    def _begin(self, needed: list[int]) -> None:
        self.cache.begin(self.layer, [(self.layer, e) for e in needed])
        self.cache.prefetch(self.next_layer)  # overlaps this layer's reads and compute

    def _read(self, group: list[int]) -> dict[int, dict[str, torch.Tensor]]:
        """Read ``group``'s experts; they stay resident until the next group or the end."""
        keys = [(self.layer, e) for e in group]
        self.cache.computing(keys)
        names = [n for n in NAMES if self.has(n)]
        return {e: dict(zip(names, self.cache.get(k), strict=True)) for e, k in zip(group, keys)}

    def _end(self, needed: list[int]) -> None:
        self.cache.computing([])
        self.cache.record(self.layer, needed)

    def has(self, name: str) -> bool:
        """Whether the experts hold ``name`` (w3 only when gated, biases only with biases)."""
        return (name[0] == "w" or self.has_bias) and (name[1] != "3" or self.gated)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, layer={self.layer}, offloaded"


def offload(model: nn.Module, *, budget_bytes: int, store: str | Path) -> ExpertCache:
    """Move every MoE layer's experts of ``model`` to safetensors files in ``store`` and serve
    them from a resident set of at most ``budget_bytes`` (see the module docstring). The model
    is changed in place (its experts' memory is released); the returned ``ExpertCache`` holds
    the statistics (``.stats``) and is closed with ``.close()``.

    Raises:
        ValueError: ``budget_bytes`` not a positive int, or smaller than one expert (naming both
            sizes); a model without MoE layers; experts sharded over processes.
    """
    layers = _check(model, budget_bytes)
    store = Path(store)
    store.mkdir(parents=True, exist_ok=True)
    files, sizes = [], []
    for name, layer in layers:
        path = store / f"{name}.safetensors"
        save_file(_expert_tensors(layer.experts), path)
        files.append(path)
        sizes.append(expert_nbytes(layer.experts))
    cache = ExpertCache(files, sizes, budget_bytes)
    for n, (_, layer) in enumerate(layers):
        layer.experts = OffloadedExperts(layer.experts, cache, n, (n + 1) % len(layers))
    return cache


def _expert_shapes(header: dict) -> list[tuple]:
    """(dtype, shape) of each tensor of one expert in a store file's header."""
    names = (f"{n}.0" for n in NAMES)
    return [(header[k]["dtype"], header[k]["shape"]) for k in names if k in header]


def _unheld(t: torch.Tensor) -> bool:
    """No tensor but ``t`` shares its memory and no name but the spare list holds ``t``: the
    storage's use count is ``t``'s alone (views such as ``w.t()`` add to it)."""
    storage = t.untyped_storage()  # this temporary holds one use of the storage too
    return torch._C._storage_Use_Count(storage._cdata) == 2 and sys.getrefcount(t) <= 4


def _transposed(experts: Experts) -> set[str]:
    """The matrices ``Experts`` keeps in (out, in) memory order (``w1[e]`` (D, F) as the
    transpose of an (F, D) block, ``F.linear``'s layout), to be stored and restored that way."""
    return {n for n in NAMES[:3] if _is_t(getattr(experts, n))}


def _is_t(w: torch.Tensor | None) -> bool:
    return w is not None and w[0].t().is_contiguous() and not w[0].is_contiguous()


def _expert_tensors(experts: Experts) -> dict[str, torch.Tensor]:
    """Each expert's tensors in the memory order ``Experts`` holds them (``_transposed``)."""
    out = {}
    for name in NAMES:
        w = getattr(experts, name)
        if w is None:
            continue
        for e in range(w.shape[0]):
            t = w[e].t() if _is_t(w) else w[e]
            out[f"{name}.{e}"] = t.detach().contiguous()
    return out


def _check(model: object, budget_bytes: object) -> list[tuple[str, MoE]]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes < 1:
        raise ValueError(f"budget_bytes={budget_bytes!r} must be an int > 0")
    layers = [
        (n.removesuffix(".ffn") or "moe", m) for n, m in model.named_modules() if isinstance(m, MoE)
    ]
    if not layers:
        raise ValueError("model has no MoE layers: there are no experts to offload")
    for name, layer in layers:
        if not isinstance(layer.experts, Experts):
            raise ValueError(f"{name}: its experts are already offloaded")
        if layer.expert_group is not None:
            raise ValueError(f"{name}: experts sharded over processes; offload a whole model")
    largest_name, largest = max(
        ((name, expert_nbytes(layer.experts)) for name, layer in layers), key=lambda p: p[1]
    )
    if budget_bytes < largest:
        raise ValueError(
            f"budget_bytes={budget_bytes:,} is smaller than one expert of {largest_name} "
            f"({largest:,} bytes): the budget must hold at least one expert"
        )
    return layers
