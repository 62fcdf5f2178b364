"""``moesaic upcycle``: a trained dense LM run -> an MoE run that starts from its weights."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

from moesaic._validate import prefixed_errors
from moesaic.cli.common import add_set_argument, friendly_errors
from moesaic.cli.train import summary
from moesaic.config import MoEConfig
from moesaic.train.config import ConfigError

__all__ = ["main"]


@friendly_errors("moesaic upcycle")
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="moesaic upcycle",
        description="Sparse upcycling: turn a trained dense run (e.g. recipe lm-dense-tiny) into "
        "an MoE run whose experts start as copies of the dense FFNs, then train it. The new run "
        "has the dense run's data and settings, a fresh optimizer, and a step-0 checkpoint "
        "holding the upcycled weights (moesaic train --resume --run-dir OUT continues it).",
    )
    parser.add_argument("--run", type=Path, required=True, help="the dense run directory")
    parser.add_argument(
        "--out", type=Path, default=None, help="new run directory (default RUN-upcycled-TIME)"
    )
    parser.add_argument("--experts", type=int, default=8, help="experts per MoE layer (8)")
    parser.add_argument(
        "--router",
        default="topk",
        help="router name (default topk: renormalised weights keep step 0 equal to the dense "
        "model)",
    )
    parser.add_argument("--top-k", type=int, default=2, help="experts per token (2)")
    parser.add_argument(
        "--noise", type=float, default=0.0, help="relative noise added to each expert copy (0)"
    )
    add_set_argument(parser, "train.steps=300")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    from moesaic.convert.run import PROVENANCE, upcycle_run

    out = args.out or Path(f"{args.run}-upcycled-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        with prefixed_errors("model.moe", MoEConfig):
            moe = MoEConfig(num_experts=args.experts, router=args.router, top_k=args.top_k)
        trainer = upcycle_run(
            args.run,
            out,
            moe=moe,
            noise=args.noise,
            overrides=args.overrides,
            progress=not args.no_progress,
        )
    except (ValueError, TypeError, FileExistsError) as err:
        raise ConfigError(str(err)) from None
    record = json.loads((out / PROVENANCE).read_text())
    print(
        f"upcycled {args.run} (step {record['dense_step']}) -> {out} ({args.experts} experts, "
        f"router {args.router}, top_k {args.top_k})\n"
        f"validation loss at step 0: {record['upcycled_val_loss_step0']:.4f} "
        f"(dense model: {record['dense_val_loss']:.4f})"
    )
    print(summary(trainer.fit(), trainer))
    return 0
