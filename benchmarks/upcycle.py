"""Sparse upcycling vs an MoE trained from scratch, on the same data for the same steps.

1. Train the dense recipe (``lm-dense-tiny`` by default) for ``--dense-steps``.
2. ``upcycle``: convert its newest checkpoint (``moesaic upcycle``) and train ``--steps`` more.
3. ``scratch``: the same MoE config from random initialisation, ``--steps`` steps.
4. ``dense-continued``: the dense model, fresh optimizer and the same schedule, ``--steps`` steps
   (what the upcycled model's extra compute is up against).

Runs 2-4 share data, seed, optimizer settings and schedule. Prints validation loss at every
evaluation, per run, plus seconds per step.

    python benchmarks/upcycle.py                                  # lm-dense-tiny, 600 + 300 steps
    python benchmarks/upcycle.py --dense-steps 20 --steps 10      # quick
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # python benchmarks/<name>.py

from benchmarks.harness import environment
from moesaic.config import MoEConfig
from moesaic.convert.run import upcycle_run
from moesaic.train.config import apply_overrides
from moesaic.train.recipes import get_recipe
from moesaic.train.run import load_run
from moesaic.train.trainer import Trainer

__all__ = ["main"]


def _train(trainer: Trainer) -> dict:
    start = time.perf_counter()
    result = trainer.fit()
    return {
        "evals": [(e["step"], e["val_loss"]) for e in result.evals],
        "s_per_step": trainer.train_s / max(1, result.steps),
        "wall_s": time.perf_counter() - start,
        "params": str(result.params),
    }


def run(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    steps = [f"train.steps={args.steps}", f"train.eval_every={args.eval_every}"]
    dense_cfg = apply_overrides(
        get_recipe(args.recipe),
        [f"train.steps={args.dense_steps}", f"train.eval_every={args.eval_every}", *args.overrides],
    )
    dense_dir = out / "dense"
    results = {"dense": _train(Trainer(dense_cfg, dense_dir, progress=False))}
    up = upcycle_run(
        dense_dir,
        out / "upcycle",
        moe=MoEConfig(num_experts=args.experts, router=args.router, top_k=args.top_k),
        overrides=steps,
        progress=False,
    )
    start = json.loads((out / "upcycle" / "upcycled_from.json").read_text())
    results["upcycle"] = _train(up)
    results["upcycle"]["evals"].insert(0, (0, start["upcycled_val_loss_step0"]))
    results["scratch"] = _train(Trainer(up.cfg, out / "scratch", progress=False))
    cont_cfg = apply_overrides(dataclasses.replace(dense_cfg, recipe="dense-continued"), steps)
    cont = Trainer(cont_cfg, out / "dense-continued", progress=False)
    cont.model.load_state_dict(load_run(dense_dir).model.state_dict())
    results["dense-continued"] = _train(cont)
    results["dense-continued"]["evals"].insert(0, (0, start["dense_val_loss"]))
    return {"args": vars(args), "environment": environment(), "runs": results}


def table(summary: dict) -> str:
    runs = ("upcycle", "scratch", "dense-continued")
    by_step = {name: dict(summary["runs"][name]["evals"]) for name in runs}
    steps = sorted(set().union(*by_step.values()))
    lines = [
        "| step | " + " | ".join(runs) + " |",
        "|---|" + "---|" * len(runs),
    ]
    for s in steps:
        cells = [f"{by_step[n][s]:.4f}" if s in by_step[n] else "" for n in runs]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    lines.append(
        "| s/step | " + " | ".join(f"{summary['runs'][n]['s_per_step']:.3f}" for n in runs) + " |"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="benchmarks/upcycle.py", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--recipe", default="lm-dense-tiny", help="the dense recipe")
    parser.add_argument("--dense-steps", type=int, default=600)
    parser.add_argument("--steps", type=int, default=300, help="steps of each continuing run")
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--router", default="topk")
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--out", default=f"runs/upcycle-bench-{time.strftime('%Y%m%d-%H%M%S')}")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        help="override a field of the dense run's config (repeatable)",
    )
    args = parser.parse_args(argv)
    summary = run(args)
    Path(args.out, "upcycle_bench.json").write_text(json.dumps(summary, indent=1))
    dense = summary["runs"]["dense"]
    print(
        f"Sparse upcycling: {args.recipe} trained {args.dense_steps} steps (final val loss "
        f"{dense['evals'][-1][1]:.4f}), then {args.steps} steps each; MoE: {args.experts} "
        f"experts, router {args.router}, k={args.top_k}\n{summary['environment']}\n"
    )
    print("validation loss (nats/token)\n" + table(summary))
    print(f"\nresults in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
