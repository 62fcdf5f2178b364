"""``moesaic eval --run DIR``: validation loss of a run's newest checkpoint."""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path

from moesaic.cli.common import friendly_errors
from moesaic.data import TokenStream, eval_batches, load_corpus, split_documents
from moesaic.train.run import load_run
from moesaic.train.trainer import evaluate

__all__ = ["main"]


@friendly_errors("moesaic eval")
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moesaic eval", description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a run directory")
    parser.add_argument(
        "--batches",
        type=int,
        default=None,
        help="validation batches (default: the run's data.eval_batches)",
    )
    args = parser.parse_args(argv)
    if args.batches is not None and args.batches < 1:
        parser.error(f"--batches={args.batches} must be >= 1")
    run = load_run(args.run)
    data = run.cfg.data
    if args.batches is not None:
        data = dataclasses.replace(data, eval_batches=args.batches)
    _, val_docs = split_documents(load_corpus(data.corpus), data.val_fraction, data.seed)
    val = TokenStream.from_documents(val_docs, run.tokenizer)
    loss = evaluate(run.model, eval_batches(val, data.batch_size, data.seq_len, data.eval_batches))
    bits = f" ({loss / math.log(2):.3f} bits/byte)" if data.tokenizer == "byte" else ""
    print(
        f"{args.run} step {run.step}: validation loss {loss:.4f} nats/token{bits} "
        f"over {data.eval_batches} batches"
    )
    return 0
