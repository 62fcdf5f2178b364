"""``moesaic generate --run DIR --prompt TEXT``: sample from a trained run."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from moesaic.cli.common import friendly_errors
from moesaic.inference.generate import generate_ids
from moesaic.train.run import load_run

__all__ = ["main"]


@friendly_errors("moesaic generate")
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moesaic generate", description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a run directory")
    parser.add_argument("--prompt", required=True, help="text to continue (non-empty)")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=40, help="0 = sample from all tokens")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus mass in (0, 1]; 1 = all")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not args.prompt:
        parser.error("--prompt must not be empty")
    for flag, value, ok in (
        ("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 0),
        ("--temperature", args.temperature, args.temperature >= 0),  # also refuses nan
        ("--top-k", args.top_k, args.top_k >= 0),
        ("--top-p", args.top_p, 0 < args.top_p <= 1),
    ):
        if not ok:
            rule = {"--top-p": "in (0, 1]"}.get(flag, ">= 0")
            parser.error(f"{flag}={value} must be {rule}")
    run = load_run(args.run)
    prompt = [int(i) for i in run.tokenizer.encode(args.prompt)]
    context = run.cfg.model.max_seq_len
    room = context - len(prompt)
    if room < 1:
        parser.error(f"--prompt is {len(prompt)} tokens; the model's context is {context}")
    if args.max_new_tokens > room:  # no sliding window: say so before generating anything
        parser.error(
            f"--max-new-tokens={args.max_new_tokens} must be <= {room}: the model's context is "
            f"{context} tokens (model.max_seq_len) and the prompt takes {len(prompt)}"
        )
    try:
        ids = generate_ids(
            run.model,
            prompt,
            args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k or None,
            top_p=args.top_p,
            seed=args.seed,
        )
    except ValueError as err:
        parser.error(str(err))
    print(args.prompt + run.tokenizer.decode(ids))
    return 0
