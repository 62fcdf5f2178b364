"""Expert prototyping (M6-T) against top-k at equal compute, capacity factors, aux-loss weights.

Yang et al. 2021 ("M6-T", §3-4) split the E experts into k groups ("prototypes") and route top-1
inside each: the same k expert FFNs per token as top-k routing, so equal compute, and they report
k top-1 beating top-k, more so at larger k, and that load imbalance matters little for quality.
Every row here is the sweep recipe (``lm-sweep``: the multi-domain corpus, 16 experts every
other layer) at one size, trained by the trainer for the same steps on the same batches:

- routing: top-1 (Switch), top-2 and 2 top-1 (``router=prototype``), top-4 and 4 top-1;
- capacity factors 1.0 and 1.25 (tokens over an expert's capacity dropped, position order) vs
  dropless;
- aux-loss weight 0, 0.01 (the default) and 0.1 for top-1 and 2 top-1.

Columns: final validation loss (nats/byte); the load CV (std/mean of tokens per expert, averaged
over MoE layers and over every logged step: 0 is perfectly balanced); the dropped fraction;
training FLOPs per token; training seconds. With several seeds the loss is the mean and the
spread (max - min) is shown; a seed changes the initialisation and the routers' noise, not the
batches. Finished runs are reused; ``--part i/n`` trains every n-th row
(run n processes, then once more without ``--part`` for the table).

    python benchmarks/prototyping.py --out /tmp/proto            # 16 rows, ~20 min on 1 thread
    python benchmarks/prototyping.py --steps 4 --size 16x2 --out /tmp/p   # that it runs
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # python benchmarks/<name>.py

import torch

from benchmarks.harness import environment
from moesaic.metrics.flops import lm_flops_per_token
from moesaic.metrics.routing_log import read_routing
from moesaic.train.checkpoint import list_checkpoints
from moesaic.train.config import RunConfig, apply_overrides
from moesaic.train.data import prepare_data
from moesaic.train.recipes import get_recipe
from moesaic.train.sweep import parse_size, point_config
from moesaic.train.trainer import Trainer

# (label, group of the table, overrides of model.moe)
ROWS = [
    ("top-1 (Switch)", "routing", ["router=switch", "top_k=1"]),
    ("top-2", "routing", ["router=topk", "top_k=2"]),
    ("2 top-1 (prototypes)", "routing", ["router=prototype", "top_k=2"]),
    ("top-4", "routing", ["router=topk", "top_k=4"]),
    ("4 top-1 (prototypes)", "routing", ["router=prototype", "top_k=4"]),
    ("top-1, capacity 1.0", "capacity", ["router=switch", "top_k=1", "capacity_factor=1.0"]),
    ("top-2, capacity 1.0", "capacity", ["router=topk", "top_k=2", "capacity_factor=1.0"]),
    ("2 top-1, capacity 1.0", "capacity", ["router=prototype", "top_k=2", "capacity_factor=1.0"]),
    ("top-2, capacity 1.25", "capacity", ["router=topk", "top_k=2", "capacity_factor=1.25"]),
    ("2 top-1, capacity 1.25", "capacity", ["router=prototype", "top_k=2", "capacity_factor=1.25"]),
    ("top-4, capacity 1.0", "capacity", ["router=topk", "top_k=4", "capacity_factor=1.0"]),
    ("4 top-1, capacity 1.0", "capacity", ["router=prototype", "top_k=4", "capacity_factor=1.0"]),
    ("top-1, aux 0", "aux", ["router=switch", "top_k=1", "aux_loss_weight=0"]),
    ("top-1, aux 0.1", "aux", ["router=switch", "top_k=1", "aux_loss_weight=0.1"]),
    ("2 top-1, aux 0", "aux", ["router=prototype", "top_k=2", "aux_loss_weight=0"]),
    ("2 top-1, aux 0.1", "aux", ["router=prototype", "top_k=2", "aux_loss_weight=0.1"]),
]
# aux 0.01, the default, is the routing rows' weight


def row_config(base: RunConfig, overrides: list[str], seed: int) -> RunConfig:
    return apply_overrides(base, [f"model.moe.{o}" for o in overrides] + [f"train.seed={seed}"])


def slug(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label).strip("-").lower()


def train(cfg: RunConfig, run_dir: Path, data) -> dict:
    """Train (or resume, or reuse when finished) one row's run; its measured numbers."""
    resume = bool(list_checkpoints(run_dir / "checkpoints"))
    trainer = Trainer(cfg, run_dir, resume=resume, data=data)
    result = trainer.fit()
    rows = read_routing(run_dir / "routing.jsonl")
    layers = sorted({r["layer"] for r in rows})
    mean_cv = sum(r["load_cv"] for r in rows) / len(rows)
    final = [r for r in rows if r["step"] == rows[-1]["step"]]
    return {
        "val_loss": result.val_loss,
        "load_cv_mean": mean_cv,
        "load_cv_final": sum(r["load_cv"] for r in final) / len(final),
        "dropped_mean": sum(r["dropped_fraction"] for r in rows) / len(rows),
        "train_flops_per_token": lm_flops_per_token(cfg.model, cfg.data.seq_len).train,
        "train_s": result.evals[-1]["train_s"],
        "moe_layers": len(layers),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="64x2", help="WIDTHxLAYERS or a sweep size name")
    parser.add_argument("--steps", type=int, default=600, help="training steps of every row")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of every row")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--part", default=None, help="i/n: train only rows i, i+n, ...")
    parser.add_argument("--out", type=Path, required=True, help="runs go here (and are reused)")
    args = parser.parse_args(argv)
    if min(args.steps, args.threads) < 1:
        parser.error("--steps and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    base = point_config(get_recipe("lm-sweep"), parse_size(args.size), args.steps)
    base = apply_overrides(base, [f"train.threads={args.threads}", "data.holdout_domain=none"])
    rows = list(enumerate(ROWS))
    if args.part:
        i, n = (int(v) for v in args.part.split("/"))
        rows = [r for r in rows if r[0] % n == i]
    data, results = None, {}
    for _, (label, _group, overrides) in rows:
        for seed in args.seeds:
            cfg = row_config(base, overrides, seed)
            data = data or prepare_data(cfg.data)  # the same for every row and seed
            print(f"{label}, seed {seed}", flush=True)
            results[label, seed] = train(cfg, args.out / slug(label) / f"seed{seed}", data)
    if args.part:
        return 0
    (args.out / "prototyping.json").write_text(
        json.dumps({f"{k[0]} | seed {k[1]}": v for k, v in results.items()}, indent=1)
    )
    print(
        f"# Expert prototyping vs top-k: {args.steps} steps, size {args.size}, seeds {args.seeds}"
    )
    print(environment())
    print(f"runs in {args.out}\n")
    print(
        "| group | routing | val loss | spread | load CV | dropped | train FLOPs/token | train s |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for label, group, _ in ROWS:
        rs = [results[label, s] for s in args.seeds]
        loss = [r["val_loss"] for r in rs]

        def mean(key, rs=rs):
            return sum(r[key] for r in rs) / len(rs)

        print(
            f"| {group} | {label} | {sum(loss) / len(loss):.4f} | {max(loss) - min(loss):.4f} | "
            f"{mean('load_cv_mean'):.3f} | {100 * mean('dropped_mean'):.1f}% | "
            f"{mean('train_flops_per_token') / 1e6:.3f}M | {mean('train_s'):.0f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
