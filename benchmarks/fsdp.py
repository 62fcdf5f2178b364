"""Per-rank memory of plain data parallelism against FSDP2 (``parallel.shard``), with expert
parallelism, on W local gloo processes.

For each layout it builds the trainer of a recipe, trains a few steps and reports, per rank:
the bytes of parameters, gradients and AdamW moments this rank holds (the local shards of
FSDP's DTensors), and the median step time. The bytes do not depend on the machine; the times
on 2 CPU cores with 4 processes are loaded and only say that sharding is not free.

    python benchmarks/fsdp.py --world 4 --recipe lm-moe-tiny --steps 6
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # python benchmarks/fsdp.py: the checkout's package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import moesaic as ms
from benchmarks.harness import environment
from moesaic.parallel.launch import run_local
from moesaic.train.config import apply_overrides
from moesaic.train.recipes import get_recipe
from moesaic.train.trainer import Trainer


def _bytes(tensors) -> int:
    return sum(ms.parallel.local_tensor(t).nbytes for t in tensors if t is not None)


def _measure(rank, world, recipe, expert, shard, steps, run_dir):
    groups = ms.parallel.init(expert=expert, shard=shard)
    overrides = [
        f"parallel.expert={expert}",
        f"parallel.shard={shard}",
        f"train.steps={steps}",
        f"train.eval_every={steps}",
        f"train.checkpoint_every={steps}",
        "train.sample_tokens=0",
        "train.threads=1",
    ]
    cfg = apply_overrides(get_recipe(recipe), overrides)
    trainer = Trainer(cfg, Path(run_dir), progress=False, groups=groups)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        trainer._train_step()
        trainer.step += 1
        times.append(time.perf_counter() - t0)
    params = list(trainer.model.parameters())
    moments = [v for s in trainer.optimizer.state.values() for v in s.values() if v.dim()]
    out = {
        "params": _bytes(params),
        "grads": _bytes(p.grad for p in params),
        "moments": _bytes(moments),
        "step_s": statistics.median(times[1:]),
    }
    trainer.close()
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--recipe", default="lm-moe-tiny")
    parser.add_argument("--expert", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args(argv)
    half = args.world // 2
    layouts = [(0, "plain data parallelism"), (half, f"FSDP2, HSDP {args.world // half} x {half}")]
    layouts.append((args.world, f"FSDP2 over all {args.world}"))
    print(f"# {args.recipe}, {args.world} processes, expert-parallel {args.expert}")
    print(f"# {json.dumps(environment())}")
    print("| layout | shard | params MiB | grads MiB | AdamW MiB | total MiB | step s |")
    print("|---|---|---|---|---|---|---|")
    for shard, name in layouts:
        with tempfile.TemporaryDirectory() as tmp:
            ranks = run_local(
                _measure, args.world, args.recipe, args.expert, shard, args.steps, tmp + "/run"
            )
        mib = {k: max(r[k] for r in ranks) / 2**20 for k in ("params", "grads", "moments")}
        step = statistics.median(r["step_s"] for r in ranks)
        total = sum(mib.values())
        print(
            f"| {name} | {shard} | {mib['params']:.2f} | {mib['grads']:.2f} | "
            f"{mib['moments']:.2f} | {total:.2f} | {step:.3f} |"
        )


if __name__ == "__main__":
    main()
