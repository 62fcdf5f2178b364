"""Expert-level parallelism on CPU: whole experts per thread, single-threaded kernels.

With few tokens per expert, splitting every small matmul and activation across the intra-op
threads costs a fork/join barrier per kernel (and, on a busy machine, a stall whenever one of the
team is descheduled). Here the experts are divided into one contiguous group per thread, groups
balanced by rows, and each worker thread runs its group's kernels with one intra-op thread.
Results are per expert, so they do not depend on the split.

Worker threads are created once per thread count; each sets its own intra-op thread count to 1
(an OpenMP/MKL per-thread setting), after which the process default is restored.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

__all__ = ["split_by_rows", "expert_groups", "run_groups"]

MAX_IMBALANCE = 1.25  # largest group's rows / the even share, beyond which one team is faster
# Mean rows per expert above which one team of intra-op threads per kernel is faster (measured
# side by side on 2 threads, D=512, F=2048, fwd+bwd / fwd as a ratio to the blocked dense FFN:
# 64 rows 1.23/1.38 threads vs 1.27/1.46 loop, 128 rows 1.07/1.11 vs 1.22/1.28; 256 rows
# 1.07-1.11 vs 1.08 (a tie or worse), 2048 rows 1.15/1.21 vs 1.00/1.00).
MAX_MEAN_ROWS = 192

_lock = threading.Lock()
_pools: dict[int, ThreadPoolExecutor] = {}


def _forget_pools_in_child() -> None:
    # A forked child has none of the parent's worker threads: start afresh, never wait on them.
    global _lock
    _lock = threading.Lock()
    _pools.clear()


os.register_at_fork(after_in_child=_forget_pools_in_child)


def split_by_rows(counts: Sequence[int], groups: int) -> list[list[int]]:
    """Experts with rows, in order, cut into at most ``groups`` contiguous runs of ~equal rows."""
    total = sum(counts)
    out: list[list[int]] = [[]]
    done = 0
    for e, n in enumerate(counts):
        if not n:
            continue
        # start a new group once this one holds its share of the rows
        if out[-1] and len(out) < groups and done >= total * len(out) / groups:
            out.append([])
        out[-1].append(e)
        done += n
    return [g for g in out if g]


def expert_groups(counts: Sequence[int], threads: int) -> list[list[int]]:
    """``split_by_rows`` when experts are small and the split even enough, else one group (the
    intra-op loop): large experts keep all threads busy inside each kernel, and a skewed routing
    that puts most rows on one expert would leave the other threads idle."""
    total = sum(counts)
    active = sum(1 for n in counts if n)
    if threads > 1 and total and total <= MAX_MEAN_ROWS * active:
        groups = split_by_rows(counts, threads)
        largest = max(sum(counts[e] for e in g) for g in groups)
        if len(groups) == threads and largest <= MAX_IMBALANCE * total / threads:
            return groups
    return [[e for e, n in enumerate(counts) if n]]


def _pool(threads: int) -> ThreadPoolExecutor:
    with _lock:
        pool = _pools.get(threads)
        if pool is None:
            pool = ThreadPoolExecutor(threads, thread_name_prefix="moesaic-experts")
            # Create every worker now (each blocks on the barrier until all exist) and make it
            # single-threaded; then restore the default the workers' set_num_threads(1) changed.
            barrier = threading.Barrier(threads + 1)

            def init() -> None:
                torch.set_num_threads(1)
                barrier.wait()

            for _ in range(threads):
                pool.submit(init)
            barrier.wait()
            torch.set_num_threads(threads)
            _pools[threads] = pool
        return pool


def run_groups(fn: Callable[[int], None], groups: list[list[int]]) -> None:
    """Call ``fn(e)`` for every expert, one worker thread per group, and wait for all.

    The workers copy the caller's grad and inference mode (both are thread-local in torch).
    """
    if len(groups) <= 1:
        for group in groups:
            for e in group:
                fn(e)
        return
    inference = torch.is_inference_mode_enabled()
    grad = torch.is_grad_enabled()

    def work(group: list[int]) -> None:
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            for e in group:
                fn(e)

    pool = _pool(torch.get_num_threads())
    for future in [pool.submit(work, g) for g in groups]:
        future.result()
