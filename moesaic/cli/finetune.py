"""``moesaic finetune --run DIR --task NAME``: fine-tune a pretrained run on a labelled task.

Full fine-tuning with Switch's dropout (0.1 outside experts, 0.4 inside), or prompt tuning
(``--method prompt``: the language model frozen, soft prompt and classifier trained). The run
directory holds checkpoints, metrics and ``test.json``, and resumes like a training run.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

from moesaic.cli.common import add_run_arguments, finish_distributed, friendly_errors, saved_config
from moesaic.data.labelled import LABELLED_TASKS
from moesaic.parallel import init as init_parallel
from moesaic.train.checkpoint import write_atomic
from moesaic.train.classify import pretrained_config
from moesaic.train.config import (
    ConfigError,
    RunConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
)
from moesaic.train.recipes import finetune_defaults
from moesaic.train.trainer import Trainer, TrainResult

__all__ = ["main", "finetune_config", "summary"]

TEST_FILE = "test.json"


@friendly_errors("moesaic finetune")
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="moesaic finetune", description=__doc__.splitlines()[0].split(": ", 1)[1]
    )
    parser.add_argument("--run", type=Path, help="the pretrained language model's run directory")
    parser.add_argument("--task", choices=sorted(LABELLED_TASKS), help="the labelled task")
    parser.add_argument(
        "--method",
        choices=("full", "prompt"),
        default=None,
        help="full fine-tuning (default) or prompt tuning (same as --set finetune.method=...)",
    )
    parser.add_argument(
        "--from-scratch",
        action="store_true",
        help="the pretrained run's architecture with random weights (the no-pretraining baseline)",
    )
    add_run_arguments(parser, "the fine-tuning run", "finetune.expert_dropout=0.1")
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if args.method:
        overrides.append(f"finetune.method={args.method}")
    if args.resume:
        if args.out is None:
            raise ConfigError("--resume needs --out DIR (the fine-tuning run to continue)")
        cfg = saved_config(args.out, overrides)
    else:
        if args.run is None or args.task is None:
            raise ConfigError("--run DIR and --task NAME are needed (or --resume --out DIR)")
        cfg = finetune_config(args.run, args.task, overrides, from_scratch=args.from_scratch)
    groups = init_parallel(expert=cfg.parallel.expert, shard=cfg.parallel.shard)
    out = args.out or Path("runs") / f"{cfg.recipe}-{time.strftime('%Y%m%d-%H%M%S')}"
    if groups.is_main:
        print(f"run directory: {out}")
    trainer = Trainer(cfg, out, resume=args.resume, progress=not args.no_progress, groups=groups)
    result = trainer.fit()
    text = summary(result, trainer)
    if groups.is_main:
        print(text, flush=True)
    finish_distributed(groups)
    return 0


def finetune_config(
    run: Path, task: str, overrides: list[str], *, from_scratch: bool = False
) -> RunConfig:
    """The fine-tuning run of pretrained ``run`` on ``task``: ``finetune_defaults(task)`` with
    the pretrained run's model section and tokenizer kind, then ``overrides``."""
    data = config_to_dict(finetune_defaults(task))
    pretrained = pretrained_config(run)
    data["model"] = pretrained["model"]
    data["data"]["tokenizer"] = pretrained.get("data", {}).get("tokenizer", "byte")
    # up to 128 tokens of text, leaving room for a soft prompt in the model's context
    context = int(data["model"].get("max_seq_len", 256))
    data["data"]["seq_len"] = min(128, context - 32) if context > 64 else context // 2
    data["finetune"]["init"] = "" if from_scratch else str(run)
    try:
        cfg = config_from_dict(RunConfig, data)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return apply_overrides(cfg, overrides)


def summary(result: TrainResult, trainer: Trainer) -> str:
    """Validation and test accuracy, speed and the trained / total parameters; writes the test
    metrics to ``test.json`` in the run directory (rank 0)."""
    task, model = trainer.task, trainer.model
    test = task.evaluate(model, task.batches("test"))
    if trainer.groups.is_main:
        write_atomic(trainer.run_dir / TEST_FILE, json.dumps({"step": result.steps, **test}))
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    last = result.evals[-1] if result.evals else {}
    return "\n".join(
        [
            f"steps: {result.steps}   wall-clock: {result.wall_s:.0f} s",
            f"validation: loss {last.get('val_loss', float('nan')):.4f}, "
            f"accuracy {last.get('val_acc', float('nan')):.4f}",
            f"test ({len(task.splits['test'][2])} examples): loss {test['val_loss']:.4f}, "
            f"accuracy {test['val_acc']:.4f}",
            f"training speed: {result.tokens_per_s:,.0f} examples/s",
            f"parameters trained: {trained:,} of {total:,} ({100 * trained / total:.2f}%)",
        ]
    )
