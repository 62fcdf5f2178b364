"""Expert-parallel MoE layer: bytes on the wire, all-to-all time and step time per world size.

For world sizes W in {1, 2, 4} (gloo on CPU, NCCL on GPU when there are W devices), each rank
routes T tokens (top-k) through one ``ms.MoE`` whose E experts are sharded over the W ranks, then
runs backward. Every ``all_to_all_single`` call is counted: the bytes a rank hands to it and the
seconds it takes. The floor for the token exchange is ``2 * k * T * D * element_size`` per rank
and direction (tokens out, results back); the count exchange adds ``W * E/W * 8`` bytes.

    python benchmarks/expert_parallel.py                 # W in {1, 2, 4}, gloo on CPU
    python benchmarks/expert_parallel.py --tokens 512    # quick
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # python benchmarks/<name>.py

from benchmarks.harness import AllToAllMeter, environment
from moesaic.parallel.launch import run_local

__all__ = ["main"]


def _worker(rank, world, args):
    import moesaic as ms

    groups = ms.parallel.init(expert=world)
    device = torch.device("cuda", rank) if torch.cuda.is_available() and world > 1 else "cpu"
    torch.manual_seed(0)
    layer = ms.MoE(
        args.d_model,
        args.d_ff,
        args.experts,
        router="topk",
        top_k=args.top_k,
        expert_group=groups.expert_group,
    ).to(device)
    x = torch.randn(args.tokens, args.d_model, device=device, generator=None)
    fwd_bytes, steps, a2a = [], [], []
    with AllToAllMeter() as meter:
        for i in range(args.warmup + args.repeats):
            meter.bytes, meter.seconds = 0, 0.0
            for p in layer.parameters():
                p.grad = None
            start = time.perf_counter()
            y = layer(x)
            forward_bytes = meter.bytes
            y.pow(2).mean().backward()
            if world > 1:
                dist.barrier()
            elapsed = time.perf_counter() - start
            if i >= args.warmup:
                fwd_bytes.append(forward_bytes)
                steps.append(elapsed)
                a2a.append(meter.seconds)
    # A rank sends its own k*T rows and returns the rows it received, so ranks that host busier
    # experts send more; the mean over ranks is what the floor describes.
    sent = torch.tensor([statistics.median(fwd_bytes)], dtype=torch.float64)
    per_rank = [torch.zeros_like(sent) for _ in range(world)]
    if world > 1:
        dist.all_gather(per_rank, sent)
    else:
        per_rank = [sent]
    return {
        "world": world,
        "mean_bytes": float(torch.cat(per_rank).mean()),
        "max_bytes": float(torch.cat(per_rank).max()),
        "step_s": statistics.median(steps),
        "a2a_s": statistics.median(a2a),
    }


def measure(world: int, args) -> dict:
    return run_local(_worker, world, args, threads=args.threads)[0]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="benchmarks/expert_parallel.py", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--tokens", type=int, default=4096, help="T, tokens per rank")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--d-ff", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = parser.parse_args(argv)
    for w in args.worlds:
        if args.experts % w:
            parser.error(f"--experts={args.experts} must be divisible by world size {w}")
    floor = 2 * args.top_k * args.tokens * args.d_model * 4  # fp32 rows out and back
    print(
        f"Expert-parallel MoE layer: T={args.tokens} tokens per rank, D={args.d_model}, "
        f"F={args.d_ff}, E={args.experts}, k={args.top_k}, fp32, "
        f"{'nccl' if torch.cuda.is_available() else 'gloo'}, {args.threads} thread(s) per "
        f"process, median of {args.repeats}\n{environment()}\n"
    )
    print(
        "| W | forward bytes sent, mean / max over ranks | floor 2kTD*4 + counts | "
        "mean / floor | all-to-all ms (fwd+bwd) | step ms (fwd+bwd) |"
    )
    print("|---|---|---|---|---|---|")
    for w in args.worlds:
        r = measure(w, args)
        counts = 0 if w == 1 else w * (args.experts // w) * 8
        want = 0 if w == 1 else floor + counts
        ratio = "-" if w == 1 else f"{r['mean_bytes'] / want:.4f}"
        print(
            f"| {w} | {r['mean_bytes']:,.0f} / {r['max_bytes']:,.0f} | {want:,} | {ratio} | "
            f"{1e3 * r['a2a_s']:.1f} | {1e3 * r['step_s']:.1f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
