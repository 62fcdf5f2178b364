"""``moesaic train``: train a recipe, then print validation loss, speed, parameters and a sample."""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch.distributed as dist

from moesaic.cli.common import (
    add_config_arguments,
    config_from_args,
    finish_distributed,
    friendly_errors,
    saved_config,
)
from moesaic.inference.generate import generate_ids
from moesaic.parallel import init as init_parallel
from moesaic.train.checkpoint import list_checkpoints
from moesaic.train.config import ConfigError
from moesaic.train.trainer import Trainer, TrainResult

__all__ = ["main"]


@friendly_errors("moesaic train")
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="moesaic train",
        description="Train a recipe (default: a small Switch-style MoE LM on the Python "
        "standard library's source, 4-7 minutes on 2 CPU cores; image recipes: vmoe-fashion, "
        "vit-fashion, sparse-mlp-fashion, mixer-fashion, vmoe-digits).",
    )
    add_config_arguments(parser)
    parser.add_argument(
        "--run-dir",
        type=Path,
        default=None,
        help="where to write the run (default runs/RECIPE-TIMESTAMP)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --run-dir from its newest checkpoint",
    )
    parser.add_argument(
        "--auto-resume",
        action="store_true",
        help="resume when --run-dir has a checkpoint, else start fresh (for torchrun "
        "--max-restarts: every restart runs the same command)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if (args.resume or args.auto_resume) and args.run_dir is None:
        raise ConfigError("--resume and --auto-resume need --run-dir DIR (the run to continue)")
    started = args.run_dir is not None and (
        (args.run_dir / "config.json").exists() or _has_checkpoint(args.run_dir)
    )
    if args.auto_resume:  # a run that started keeps its config, checkpointed yet or not
        args.resume = _has_checkpoint(args.run_dir)
    use_saved = args.resume or (args.auto_resume and started)
    cfg = saved_config(args.run_dir, args.overrides) if use_saved else config_from_args(args)
    # torchrun's environment, if any
    groups = init_parallel(expert=cfg.parallel.expert, shard=cfg.parallel.shard)
    run_dir = _shared_run_dir(
        args.run_dir or Path("runs") / f"{cfg.recipe}-{time.strftime('%Y%m%d-%H%M%S')}", groups
    )
    if groups.is_main:
        layout = f"{groups.world_size} processes, expert-parallel size {groups.expert_size}"
        if groups.sharded:
            layout += f", FSDP shard size {groups.shard_size}"
        print(f"run directory: {run_dir}" + (f" ({layout})" if groups.distributed else ""))
    trainer = Trainer(
        cfg, run_dir, resume=args.resume, progress=not args.no_progress, groups=groups
    )
    result = trainer.fit()
    text = summary(result, trainer)  # every rank: sampling runs collective forwards
    if groups.is_main:
        print(text, flush=True)
    finish_distributed(groups)
    return 0


def _has_checkpoint(run_dir: Path) -> bool:
    return bool(list_checkpoints(run_dir / "checkpoints"))


def _shared_run_dir(run_dir: Path, groups) -> Path:
    """Rank 0's choice of run directory (timestamps could differ between processes)."""
    if not groups.distributed:
        return run_dir
    box = [str(run_dir)]
    dist.broadcast_object_list(box, src=0)
    return Path(box[0])


def summary(result: TrainResult, trainer: Trainer) -> str:
    cfg = trainer.cfg
    if cfg.vision is not None:  # an image run: accuracy, no text sample
        from moesaic.cli.vision import summary as vision_summary

        return vision_summary(result, trainer)
    if cfg.finetune is not None:  # a classifier: accuracy, no text sample
        from moesaic.cli.finetune import summary as finetune_summary

        return finetune_summary(result, trainer)
    lines = [
        f"steps: {result.steps}   wall-clock: {result.wall_s:.0f} s",
        f"validation loss: {result.val_loss:.4f} nats/token"
        + (
            f" ({result.val_loss / math.log(2):.3f} bits/byte)"
            if cfg.data.tokenizer == "byte"
            else ""
        ),
        f"training speed: {result.tokens_per_s:,.0f} tokens/s"
        if result.trained_steps
        else f"training speed: no steps trained (the run had already reached step "
        f"{result.steps} of train.steps={cfg.train.steps})",
        f"parameters: {result.params}",
    ]
    if cfg.train.sample_tokens:
        tok = trainer.data.tokenizer
        prompt = list(tok.encode(cfg.train.sample_prompt))
        room = cfg.model.max_seq_len - len(prompt)
        ids = generate_ids(
            trainer.model,
            prompt,
            min(cfg.train.sample_tokens, room),
            temperature=0.8,
            top_k=40,
            seed=cfg.train.seed,
        )
        lines += ["sample:", cfg.train.sample_prompt + tok.decode(ids)]
    return "\n".join(lines)
