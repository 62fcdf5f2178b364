"""``moesaic generate --run DIR --prompt TEXT [--prompt TEXT ...]``: sample from a trained run.

Several prompts decode together as one batch (left-padded; each row stops at ``--stop`` or
``--max-new-tokens``, and gives what it would give alone with seed ``--seed`` + its index).
The continuations go to stdout, one after the other; tokens/s goes to stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from moesaic.cli.common import friendly_errors
from moesaic.cli.extract import task_names
from moesaic.inference.generate import generate_batch, generate_ids
from moesaic.models.lm import MoELM
from moesaic.train.run import load_run

__all__ = ["main"]


@friendly_errors("moesaic generate")
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moesaic generate", description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a run directory")
    parser.add_argument(
        "--prompt",
        required=True,
        action="append",
        help="text to continue (non-empty); repeat for a batch of prompts",
    )
    parser.add_argument("--stop", default=None, help="a row stops once its text holds this")
    parser.add_argument(
        "--task", default=None, help="a task-routed (TaskMoE) run: the domain to decode as"
    )
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=40, help="0 = sample from all tokens")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus mass in (0, 1]; 1 = all")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not all(args.prompt):
        parser.error("--prompt must not be empty")
    if args.stop == "":
        parser.error("--stop must not be empty")
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
    prompts = [[int(i) for i in run.tokenizer.encode(p)] for p in args.prompt]
    longest = max(len(p) for p in prompts)
    # a Transformer has a context and a KV cache; a recurrent model (LSTMMoE) neither
    cached = isinstance(run.model, MoELM)
    context = run.cfg.model.max_seq_len if cached else longest + args.max_new_tokens
    room = context - longest
    if room < 1:
        parser.error(f"--prompt is {longest} tokens; the model's context is {context}")
    if args.max_new_tokens > room:  # no sliding window: say so before generating anything
        parser.error(
            f"--max-new-tokens={args.max_new_tokens} must be <= {room}: the model's context is "
            f"{context} tokens (model.max_seq_len) and the longest prompt takes {longest}"
        )

    task = None
    if args.task is not None:
        names = task_names(run.cfg.data.corpus)
        if args.task not in names:
            parser.error(
                f"--task={args.task!r} is not one of {names} (the domains of "
                f"data.corpus={run.cfg.data.corpus!r})"
            )
        task = names.index(args.task)

    def stop(ids: list[int]) -> bool:
        return args.stop in run.tokenizer.decode(ids)

    start = time.perf_counter()
    try:
        if not cached:  # one prompt at a time, recomputing the prefix (seed + index per row)
            outs = [
                generate_ids(
                    run.model,
                    prompt,
                    args.max_new_tokens,
                    temperature=args.temperature,
                    top_k=args.top_k or None,
                    top_p=args.top_p,
                    seed=args.seed + i,
                    use_cache=False,
                )
                for i, prompt in enumerate(prompts)
            ]
        else:
            outs = generate_batch(
                run.model,
                prompts,
                args.max_new_tokens,
                temperature=args.temperature,
                top_k=args.top_k or None,
                top_p=args.top_p,
                seed=args.seed,
                stop=stop if args.stop is not None else None,
                task=task,
            )
    except ValueError as err:
        parser.error(str(err))
    seconds = time.perf_counter() - start
    for i, (prompt, ids) in enumerate(zip(args.prompt, outs)):
        text = run.tokenizer.decode(ids)
        if args.stop is not None and args.stop in text:
            text = text[: text.index(args.stop) + len(args.stop)]
        print(("\n" if i else "") + prompt + text)
    tokens = sum(len(ids) for ids in outs)
    print(
        f"moesaic generate: {tokens} new tokens in {len(outs)} sequences, {seconds:.2f} s, "
        f"{tokens / max(seconds, 1e-9):,.1f} tokens/s",
        file=sys.stderr,
    )
    return 0
