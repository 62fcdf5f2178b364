"""Run a function in W local processes with torchrun's environment (for tests and benchmarks).

``run_local(fn, world, *args)`` starts ``world`` processes (spawn), sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and a free MASTER_PORT as torchrun would, calls ``fn(rank, world,
*args)`` in each and returns the ranks' return values. A failure in any rank is re-raised here
with that rank's traceback.
"""

from __future__ import annotations

import os
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["run_local", "free_port"]


def free_port() -> int:
    """A TCP port nobody listens on right now (port 0 is not accepted by the rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args, results, threads: int) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(threads)
    try:
        results.put((rank, "ok", fn(rank, world, *args)))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_local(fn: Callable[..., Any], world: int, *args: Any, threads: int = 1) -> list[Any]:
    """``[fn(0, world, *args), ..., fn(world - 1, world, *args)]``, each in its own process."""
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    try:
        mp.start_processes(
            _entry,
            args=(world, free_port(), fn, args, results, threads),
            nprocs=world,
            join=True,
            start_method="spawn",
        )
    except mp.ProcessExitedException:
        errors = []
        while not results.empty():
            rank, status, payload = results.get()
            if status == "error":
                errors.append(f"rank {rank}:\n{payload}")
        raise AssertionError("\n".join(errors) or "a process died without a traceback") from None
    out: dict[int, Any] = {}
    while not results.empty():
        rank, _, value = results.get()
        out[rank] = value
    return [out[r] for r in range(world)]
