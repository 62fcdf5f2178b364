"""``moesaic eval --run DIR``: validation loss of a run's newest checkpoint."""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path

from moesaic.cli.common import friendly_errors
from moesaic.data import TokenStream, eval_batches
from moesaic.train.checkpoint import load_newest_fitting
from moesaic.train.config import RunConfig, config_from_dict
from moesaic.train.data import split_corpus
from moesaic.train.run import load_run, read_run_config
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
    cfg = config_from_dict(RunConfig, read_run_config(args.run))
    if cfg.vision is not None:
        return _eval_images(args.run, args.batches)
    if cfg.finetune is not None:
        return _eval_classifier(args.run, cfg, args.batches)
    run = load_run(args.run)
    data = run.cfg.data
    if args.batches is not None:
        data = dataclasses.replace(data, eval_batches=args.batches)
    _, val_docs, held_docs, domains = split_corpus(data)

    def loss_on(docs: list) -> float:
        # domain ids as training numbered them (over the whole corpus): a task-routed model
        # reads each row's domain as its task
        stream = TokenStream.from_documents(docs, run.tokenizer, domains=domains)
        return evaluate(
            run.model, eval_batches(stream, data.batch_size, data.seq_len, data.eval_batches)
        )

    loss = loss_on(val_docs)
    bits = f" ({loss / math.log(2):.3f} bits/byte)" if data.tokenizer == "byte" else ""
    print(
        f"{args.run} step {run.step}: validation loss {loss:.4f} nats/token{bits} "
        f"over {data.eval_batches} batches"
    )
    if held_docs:
        print(
            f"held-out domain {data.holdout_domain!r} (never trained on): "
            f"loss {loss_on(held_docs):.4f} nats/token"
        )
    return 0


def _eval_classifier(run_dir: Path, cfg: RunConfig, batches: int | None) -> int:
    """A fine-tuning run: loss and accuracy on the validation and test splits."""
    from moesaic.train.classify import Classification

    task = Classification(cfg)
    task.prepare(run_dir, is_main=False)
    if not task.started:
        raise FileNotFoundError(f"{run_dir}/checkpoints holds no checkpoint yet")
    model = task.build_model(None)
    state = load_newest_fitting(
        model, run_dir / "checkpoints", lambda message: print(f"moesaic: {message}")
    )
    if state is None:
        raise FileNotFoundError(f"{run_dir}/checkpoints holds no usable checkpoint")
    for split in ("val", "test"):
        m = task.evaluate(model, task.batches(split, batches))
        print(
            f"{run_dir} step {state['step']}: {split} loss {m['val_loss']:.4f}, accuracy "
            f"{m['val_acc']:.4f} over {sum(len(b.y) for b in task.batches(split, batches))} "
            f"examples"
        )
    return 0


def _eval_images(run_dir: Path, batches: int | None) -> int:
    """An image run: loss and accuracy on the validation and test splits."""
    from moesaic.train.vision import load_vision_run

    run = load_vision_run(run_dir)
    what = "partner retrieval" if run.task.contrastive else "accuracy"
    for split in ("val", "test"):
        data = run.task.batches(split, batches)
        m = run.task.evaluate(run.model, data)
        print(
            f"{run_dir} step {run.step}: {split} loss {m['val_loss']:.4f}, {what} "
            f"{m['val_acc']:.4f} over {sum(len(b.y) for b in data)} images"
        )
    return 0
