"""Expert-level parallelism on CPU: whole experts per thread, single-threaded kernels.

With few tokens per expert, splitting every small matmul and activation across the intra-op
threads costs a fork/join barrier per kernel (and, on a busy machine, a stall whenever one of the
team is descheduled). Here whole experts are handed to worker threads that each run their kernels
with one intra-op thread. The experts wait in one queue, largest first, and each worker takes the
next one as soon as it is free (longest-processing-time-first list scheduling): the workers finish
within about one small expert of each other whatever the routing, and a worker that the OS
descheduled simply takes fewer experts. Results are per expert, so they do not depend on which
worker ran what.

The calling thread is one of the workers: for the call it runs single-threaded too
(``torch.set_num_threads(1)``, restored afterwards), so only ``threads - 1`` pool threads wake up
and the caller's core never idles while they work. The pool threads are created once per thread
count; each sets its own intra-op thread count to 1 (an OpenMP per-thread setting), after which
the process default is restored.

Before the pool threads start, the caller releases its OpenMP team (``omp_pause_resource_all``,
OpenMP 5.0): after every parallel region libgomp's idle team threads spin-wait for the next one
for milliseconds (``GOMP_SPINCOUNT``), and on a machine with as many cores as threads a spinning
team thread holds the core a pool thread needs. The team is recreated by the next parallel op.
docs/performance.md ("CPU kernel tuning") has the measurements.
"""

from __future__ import annotations

import collections
import ctypes
import functools
import heapq
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from moesaic.kernels.cpu.capability import cpu_capability
from moesaic.kernels.cpu.tuning import DEFAULT_TUNING, CpuTuning

__all__ = ["expert_order", "makespan", "run_experts"]

_lock = threading.Lock()
_pools: dict[int, ThreadPoolExecutor] = {}


def _forget_pools_in_child() -> None:
    # A forked child has none of the parent's worker threads: start afresh, never wait on them.
    global _lock
    _lock = threading.Lock()
    _pools.clear()


os.register_at_fork(after_in_child=_forget_pools_in_child)


def makespan(rows: Sequence[int], workers: int) -> int:
    """Rows on the busiest worker when ``rows``, in this order, each go to the first free one."""
    loads = [0] * workers
    for n in rows:
        heapq.heapreplace(loads, loads[0] + n)
    return max(loads)


def expert_order(
    counts: Sequence[int],
    threads: int,
    tuning: CpuTuning = DEFAULT_TUNING,
    weight_numel: int | None = None,
) -> list[int] | None:
    """Experts with rows, largest first, when worker threads should run them; None for the
    intra-op loop. Under ``workers="auto"`` mid-sized experts take the loop where they measured
    faster with all threads inside each kernel (``loop_vendors``; on every CPU for experts of
    fewer than ``loop_small`` weights per projection, ``weight_numel`` = D * F), and so does a
    skewed routing that puts most rows on one expert (it would leave the other threads idle);
    ``workers="threads"`` takes the workers whenever there are two or more threads."""
    total = sum(counts)
    active = [e for e, n in enumerate(counts) if n]
    if threads <= 1 or not total:
        return None
    order = sorted(active, key=lambda e: -counts[e])
    if tuning.workers == "threads":
        return order
    lo, hi = tuning.loop_rows
    band = lo * len(active) < total < hi * len(active) and total <= tuning.loop_max_total
    small = weight_numel is not None and weight_numel < tuning.loop_small
    if band and (small or cpu_capability().vendor in tuning.loop_vendors):
        return None
    if makespan([counts[e] for e in order], threads) > tuning.max_imbalance * total / threads:
        return None
    return order


def _loaded_openmp() -> list[str]:
    """Sonames of the OpenMP runtimes, then the paths of those this process has mapped (Linux):
    wheels repaired by auditwheel carry a renamed copy (torch's aarch64 wheels:
    ``torch.libs/libgomp-<hash>.so.1.0.0``) that the plain soname does not find."""
    names = ["libgomp.so.1", "libomp.so", "libiomp5.so"]
    try:
        with open("/proc/self/maps", encoding="ascii", errors="replace") as f:
            paths = {line.split()[-1] for line in f if "/lib" in line and "omp" in line}
    except OSError:
        return names
    base = ("libgomp", "libomp", "libiomp5")
    return names + sorted(p for p in paths if os.path.basename(p).startswith(base))


@functools.cache
def _openmp_pause() -> Callable[[], int] | None:
    """``omp_pause_resource_all(omp_pause_soft)`` of the OpenMP runtime already loaded in this
    process (torch's libgomp on Linux wheels; LLVM's or Intel's elsewhere), or None."""
    for name in _loaded_openmp():
        try:
            lib = ctypes.CDLL(name, mode=os.RTLD_NOLOAD)  # never loads a second runtime
        except (OSError, AttributeError):
            continue
        fn = getattr(lib, "omp_pause_resource_all", None)
        if fn is not None:
            fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
            return functools.partial(fn, 1)  # omp_pause_soft
    return None


def _release_openmp() -> None:
    """Let the caller's idle OpenMP team threads exit instead of spinning on the cores the pool
    threads are about to use (they only ever belong to the calling thread's team)."""
    pause = _openmp_pause()
    if pause is not None:
        pause()


def _pool(threads: int) -> ThreadPoolExecutor:
    with _lock:
        pool = _pools.get(threads)
        if pool is None:
            workers = threads - 1  # the caller is the last one
            pool = ThreadPoolExecutor(workers, thread_name_prefix="moesaic-experts")
            # Create every worker now (each blocks on the barrier until all exist) and make it
            # single-threaded; then restore the default the workers' set_num_threads(1) changed.
            barrier = threading.Barrier(workers + 1)

            def init() -> None:
                torch.set_num_threads(1)
                barrier.wait()

            for _ in range(workers):
                pool.submit(init)
            barrier.wait()
            torch.set_num_threads(threads)
            _pools[threads] = pool
        return pool


def run_experts(
    fn: Callable[[int], None],
    counts: Sequence[int],
    threads: int,
    tuning: CpuTuning = DEFAULT_TUNING,
    weight_numel: int | None = None,
) -> None:
    """Call ``fn(e)`` once for every expert with rows and return when all calls have.

    ``threads`` > 1 and small, evenly routed experts (``expert_order``, which also weighs the
    experts' ``weight_numel``, D * F): the calling thread and ``threads - 1`` pool threads, each
    single-threaded, take the experts from one queue, largest first; else the experts run in
    order on the calling thread with its intra-op threads. The workers copy the caller's grad
    and inference mode (both are thread-local in torch). An error in any call empties the queue
    and reaches the caller.
    """
    order = expert_order(counts, threads, tuning, weight_numel)
    if order is None:
        for e, n in enumerate(counts):
            if n:
                fn(e)
        return
    queue = collections.deque(order)
    inference = torch.is_inference_mode_enabled()
    grad = torch.is_grad_enabled()

    def work() -> None:
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            while True:
                try:
                    e = queue.popleft()  # atomic: no two workers get the same expert
                except IndexError:
                    return
                try:
                    fn(e)
                except BaseException:
                    queue.clear()
                    raise

    pool = _pool(threads)
    if tuning.release_openmp:
        _release_openmp()
    futures = [pool.submit(work) for _ in range(threads - 1)]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        work()
    finally:
        try:
            for future in futures:  # an error in the caller empties the queue: this is short
                future.result()
        finally:
            torch.set_num_threads(before)
