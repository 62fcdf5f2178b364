"""Every router in ``ms.ROUTERS`` trained on the same MoE language model, data and budget.

Each router replaces the recipe's (``model.moe.router``) with its own default k (or ``--top-k``)
and everything else unchanged: same data, batches (the sampler is a pure function of seed and
batch number), optimizer and steps. One table row per router:

- val loss: mean next-token cross-entropy on the recipe's fixed validation windows at the end;
- load CV: coefficient of variation of tokens per expert (0 = perfectly even), mean over the MoE
  layers and the logged steps of the last quarter of training;
- dropped: fraction of assignments over capacity (0 for dropless routing), same average;
- entropy: mean entropy (nats) of the router's per-token distribution, same average;
- step ms: training seconds (no evaluation, no saving) per step.

Rows for the options of the token-choice routers follow the routers (``VARIANTS``):
``topk-auxfree`` (DeepSeek-V3: sigmoid scores balanced by a bias, no aux loss) and
``topk-grouped`` (group-limited top-k: experts in 8 groups, a token chooses inside its 2 best).

Routers that need inputs a language model does not have are listed with the reason, not run:
``task`` and ``skill`` read task ids (``ms.routing_context(task=...)``), ``cluster`` routes by
centroids fitted to features beforehand (``ClusterRouter.fit``).

    python benchmarks/routers.py                          # lm-moe-tiny, 300 steps, every router
    python benchmarks/routers.py --steps 1000 --routers switch topk base
    python benchmarks/routers.py --set model.moe.num_experts=8 --out /tmp/routers
    python benchmarks/routers.py --plot routers.png      # load CV and entropy over training
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # python benchmarks/<name>.py

import moesaic as ms
from moesaic.cli.timing import environment
from moesaic.metrics import plots
from moesaic.metrics.routing_log import ROUTING_FILE
from moesaic.train.config import ConfigError, RunConfig, apply_overrides
from moesaic.train.data import prepare_data
from moesaic.train.recipes import DEFAULT_RECIPE, RECIPES, get_recipe
from moesaic.train.trainer import Trainer

__all__ = ["main", "router_config", "routing_summary", "NOT_FOR_LM", "VARIANTS"]

# Routers that read something a language model's batch does not carry.
NOT_FOR_LM = {
    "task": "needs task ids (ms.routing_context(task=...)); see the TaskMoE docs",
    "skill": "needs task ids mapped to skills (ms.routing_context(task=...)); see SkillNet",
    "cluster": "needs centroids fitted to features first (ClusterRouter.fit, hard MoE)",
}

# Named rows that run a router of ms.ROUTERS with options: (router, --set overrides).
VARIANTS = {
    "topk-auxfree": (
        "topk",
        [
            "model.moe.router_options.score_func=sigmoid",
            "model.moe.router_options.balance_rate=0.001",
            "model.moe.aux_loss_weight=0",
        ],
    ),
    "topk-grouped": (
        "topk",
        ["model.moe.router_options.n_groups=8", "model.moe.router_options.topk_groups=2"],
    ),
}


def router_config(base: RunConfig, router: str, top_k: int | None, steps: int) -> RunConfig:
    """``base`` with ``router`` (a name in ``ms.ROUTERS`` or ``VARIANTS``; its default k unless
    ``top_k``), ``steps`` steps, one evaluation at the end, routing statistics logged 20 times,
    no sample, no mid-run saves."""
    log_every = max(1, steps // 20)
    name, (router, options) = router, VARIANTS.get(router, (router, []))
    return apply_overrides(
        base,
        [
            f"recipe={base.recipe}+{name}",
            f"model.moe.router={router}",
            f"model.moe.top_k={'none' if top_k is None else top_k}",
            "model.moe.router_options={}",
            "model.moe.jitter=none",
            f"train.steps={steps}",
            f"train.eval_every={steps}",
            f"train.checkpoint_every={steps}",
            f"train.log_every={log_every}",
            "train.sample_tokens=0",
            *options,
        ],
    )


def routing_summary(run_dir: Path, steps: int) -> dict[str, float]:
    """Mean load CV, dropped fraction and entropy over the MoE layers and the logged steps of
    the last quarter of training (routing.jsonl)."""
    rows = [json.loads(line) for line in (run_dir / ROUTING_FILE).read_text().splitlines()]
    late = [r for r in rows if r["step"] > 0.75 * steps] or rows
    return {
        key: statistics.fmean(float(r[key]) for r in late)
        for key in ("load_cv", "dropped_fraction", "entropy")
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="benchmarks/routers.py", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--recipe", default=DEFAULT_RECIPE, choices=sorted(RECIPES))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument(
        "--routers",
        nargs="+",
        metavar="NAME",
        help="names in ms.ROUTERS or VARIANTS (default: all of both)",
    )
    parser.add_argument("--top-k", type=int, help="k for every router (default: each router's)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE"
    )
    parser.add_argument("--out", type=Path, help="keep the runs here (default: a temp dir)")
    parser.add_argument(
        "--plot", type=Path, metavar="PNG", help="draw load CV and entropy over training here"
    )
    args = parser.parse_args(argv)
    if args.plot is not None:
        try:
            plots.require_matplotlib()
        except ImportError as err:
            parser.error(f"--plot {args.plot}: {err}")
    if args.steps < 1:
        parser.error(f"--steps {args.steps}: must be >= 1")
    names = args.routers or [*sorted(ms.ROUTERS), *VARIANTS]
    unknown = [n for n in names if n not in ms.ROUTERS and n not in VARIANTS]
    if unknown:
        known = ", ".join([*ms.ROUTERS, *VARIANTS])
        parser.error(f"--routers {' '.join(unknown)}: not in ms.ROUTERS or VARIANTS ({known})")
    try:
        base = apply_overrides(get_recipe(args.recipe), args.overrides)
    except ConfigError as err:
        parser.error(str(err))
    if base.model.moe is None:
        parser.error(f"--recipe {args.recipe}: a dense model has no router")
    configs, not_run = {}, dict(NOT_FOR_LM)
    for name in names:
        if name in NOT_FOR_LM:
            continue
        try:
            configs[name] = router_config(base, name, args.top_k, args.steps)
        except ConfigError as err:  # a variant's options that do not fit this model
            if name not in VARIANTS or args.routers:
                parser.error(str(err))
            not_run[name] = str(err)
    out = args.out or Path(tempfile.mkdtemp(prefix="moesaic-routers-"))
    data = prepare_data(base.data)
    print(
        f"Routers on {args.recipe} ({args.steps} steps, {base.data.batch_size} x "
        f"{base.data.seq_len} tokens per step, E={base.model.moe.num_experts}), runs in {out}\n"
        f"{environment()}\n"
    )
    print("| router | k | val loss | load CV | dropped | entropy | step ms |")
    print("|---|---|---|---|---|---|---|")
    for name, cfg in configs.items():
        run_dir = out / name
        result = Trainer(cfg, run_dir, progress=sys.stderr.isatty(), data=data).fit()
        stats = routing_summary(run_dir, args.steps)
        k = cfg.model.moe.experts_per_token
        step_ms = 1e3 * result.evals[-1]["train_s"] / max(1, result.trained_steps)
        print(
            f"| {name} | {k} | {result.val_loss:.4f} | {stats['load_cv']:.3f} | "
            f"{100 * stats['dropped_fraction']:.1f}% | {stats['entropy']:.3f} | {step_ms:.1f} |",
            flush=True,
        )
    if args.plot is not None:
        runs = {
            name: [json.loads(line) for line in (out / name / ROUTING_FILE).open()]
            for name in configs
        }
        args.plot.write_bytes(plots.router_comparison(runs))
        print(f"\nplot: {args.plot}")
    for name in names:
        if name in not_run:
            print(f"- not run: {name}: {not_run[name]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
