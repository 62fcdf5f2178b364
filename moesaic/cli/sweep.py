"""``moesaic sweep``: MoE vs its FLOPs-matched dense baseline at several model sizes and
training budgets; the compute speed-up factor against training FLOPs."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from moesaic.cli.common import add_set_argument, config_from_args, friendly_errors
from moesaic.train.config import ConfigError
from moesaic.train.recipes import RECIPES
from moesaic.train.sweep import SWEEP_SIZES, parse_size, run_sweep, sweep_table

__all__ = ["main"]

SWEEP_RECIPE = "lm-sweep"


def _named_sizes() -> str:
    return ", ".join(f"{k} ({v['d_model']}x{v['n_layers']})" for k, v in SWEEP_SIZES.items())


@friendly_errors("moesaic sweep")
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="moesaic sweep",
        description="Train the MoE recipe and its dense baseline (same activated FLOPs per "
        "token, same batches) at every size and budget; write sweep.json, sweep.md and "
        "sweep.png. Rerunning the same command resumes: finished points are reused, "
        "interrupted runs continue from their checkpoints.",
    )
    parser.add_argument(
        "--recipe",
        default=SWEEP_RECIPE,
        help=f"the MoE language-model recipe to scale (default {SWEEP_RECIPE}: the multi-domain "
        f"corpus with one domain held out); one of {', '.join(sorted(RECIPES))}",
    )
    add_set_argument(parser, "data.holdout_domain=fortunes")
    parser.add_argument(
        "--sizes",
        default="xs,s,m,l",
        help=f"comma-separated sizes: {_named_sizes()}, or WIDTHxLAYERS (default xs,s,m,l)",
    )
    parser.add_argument(
        "--budgets",
        default="300,900",
        help="comma-separated training steps per point (default 300,900)",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="sweep directory (default runs/sweep-RECIPE)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    names = [s.strip() for s in args.sizes.split(",") if s.strip()]
    if len(set(names)) != len(names):
        raise ConfigError(f"--sizes={args.sizes!r} repeats a size")
    sizes = {name: parse_size(name) for name in names}
    try:
        budgets = [int(b) for b in args.budgets.split(",")]
    except ValueError:
        raise ConfigError(
            f"--budgets={args.budgets!r} must be comma-separated step counts"
        ) from None
    cfg = config_from_args(args)
    out = args.out or Path("runs") / f"sweep-{cfg.recipe}"
    result = run_sweep(cfg, out, sizes, budgets, progress=not args.no_progress)
    print(f"results in {out} (sweep.json, sweep.md, sweep.png)")
    print(sweep_table(result))
    return 0
