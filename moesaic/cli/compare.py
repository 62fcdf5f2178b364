"""``moesaic compare``: train the MoE recipe and its FLOPs-matched dense baseline, then plot."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

from moesaic.cli.common import add_config_arguments, config_from_args, friendly_errors
from moesaic.train.compare import run_compare

__all__ = ["main"]


@friendly_errors("moesaic compare")
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="moesaic compare",
        description="Train the MoE recipe and a dense baseline with the same activated FLOPs per "
        "token on the same batches; write compare.png and compare.json and print the ratios.",
    )
    add_config_arguments(parser)
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output directory (default runs/compare-RECIPE-TIMESTAMP)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    out = args.out or Path("runs") / f"compare-{cfg.recipe}-{time.strftime('%Y%m%d-%H%M%S')}"
    result = run_compare(cfg, out, progress=not args.no_progress)
    print(report(result.summary, out))
    return 0


def report(s: dict, out: Path) -> str:
    moe, dense = s["runs"]["moe"], s["runs"]["dense"]

    def ratio(x):
        return "not reached" if x is None else f"{x:.2f}x"

    return "\n".join(
        [
            f"results in {out} (compare.png, compare.json)",
            "| model | params total | activated | train GFLOPs/token | s/step | final val loss |",
            "|---|---|---|---|---|---|",
            *[
                f"| {name} | {r['params_total'] / 1e6:.2f}M | {r['params_activated'] / 1e6:.2f}M | "
                f"{r['train_flops_per_token'] / 1e9:.4f} | {r['step_s']:.3f} | "
                f"{r['final_val_loss']:.4f} |"
                for name, r in (("moe", moe), ("dense", dense))
            ],
            f"MoE steps to reach the dense final loss: {ratio(s['steps_ratio'])} of dense's steps",
            f"MoE training seconds to reach it:       {ratio(s['wallclock_ratio'])} of dense's",
            f"MoE step cost: {s['step_cost_ratio']:.2f}x a dense step "
            f"(FLOPs per token {s['flops_per_token_ratio']:.3f}x)",
        ]
    )
