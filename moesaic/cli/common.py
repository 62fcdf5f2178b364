"""Shared pieces of the sub-commands: ``--set`` handling and one-line errors."""

from __future__ import annotations

import argparse
import functools
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch.distributed as dist

from moesaic.train.checkpoint import CheckpointError, CheckpointWriteError
from moesaic.train.config import ConfigError, RunConfig, apply_overrides, config_from_dict
from moesaic.train.guard import TrainingHalted
from moesaic.train.recipes import DEFAULT_RECIPE, RECIPES, get_recipe
from moesaic.train.resources import ResourceError
from moesaic.train.run import read_run_config
from moesaic.train.runlock import RunDirError
from moesaic.train.signals import signal_handlers

__all__ = [
    "add_config_arguments",
    "add_set_argument",
    "add_run_arguments",
    "config_from_args",
    "finish_distributed",
    "friendly_errors",
    "saved_config",
]


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--recipe",
        default=DEFAULT_RECIPE,
        help=f"one of: {', '.join(sorted(RECIPES))} (default {DEFAULT_RECIPE})",
    )
    add_set_argument(parser, "train.steps=200")


def add_set_argument(parser: argparse.ArgumentParser, example: str) -> None:
    """``--set SECTION.FIELD=VALUE`` (repeatable) into ``args.overrides``."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help=f"override one config field, e.g. --set {example} (repeatable)",
    )


def add_run_arguments(parser: argparse.ArgumentParser, what: str, example: str) -> None:
    """``--out``, ``--set``, ``--resume`` and ``--no-progress`` of a command that trains a new
    run (``what`` names it in the help)."""
    parser.add_argument(
        "--out", type=Path, default=None, help=f"the run directory of {what} (default under runs/)"
    )
    add_set_argument(parser, example)
    parser.add_argument(
        "--resume", action="store_true", help=f"continue {what} in --out from its checkpoint"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def finish_distributed(groups) -> None:
    """Leave together and tear the process group down: a rank exiting with a live gloo group
    can abort in its destructors ("terminate called without an active exception")."""
    if groups.distributed:
        dist.barrier()
        dist.destroy_process_group()


def config_from_args(args: argparse.Namespace) -> RunConfig:
    try:
        recipe = get_recipe(args.recipe)
        cfg = apply_overrides(recipe, args.overrides)
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if recipe.model.is_moe and not cfg.model.is_moe and cfg.recipe == recipe.recipe:
        raise ConfigError(
            f"--set model.moe=none would train a dense model under the MoE recipe's name "
            f"{recipe.recipe!r}; the dense baseline has its own recipe (lm-dense-tiny for "
            f"lm-moe-tiny), or also --set recipe=NAME"
        )
    return cfg


def saved_config(run_dir: Path, overrides: list[str]) -> RunConfig:
    """The configuration a run was started with, plus ``--set`` overrides: its config.json, or,
    when that file is missing or damaged, the copy inside its newest usable checkpoint."""
    return apply_overrides(config_from_dict(RunConfig, read_run_config(run_dir)), overrides)


class _Interrupted(KeyboardInterrupt):
    """SIGTERM outside a training loop: handled like Ctrl-C (the trainer's own handler takes
    over inside ``fit``), so a preempted command exits 143 with a line, never silently."""

    def __init__(self, signum: int) -> None:
        super().__init__()
        self.signum = signum


def _sigterm_as_interrupt():
    def handler(signum: int, frame: object) -> None:
        raise _Interrupted(signum)

    return signal_handlers([signal.SIGTERM], handler)


def friendly_errors(prog: str) -> Callable:
    """Turn user mistakes into ``prog: error: ...`` on stderr and exit status 2, no traceback;
    a run the guard stopped (moesaic/train/guard.py) exits 3 with its report."""

    def wrap(main: Callable[[Sequence[str] | None], int]) -> Callable[[Sequence[str] | None], int]:
        @functools.wraps(main)
        def run(argv: Sequence[str] | None = None) -> int:
            with _sigterm_as_interrupt():
                return _run(argv)

        def _run(argv: Sequence[str] | None) -> int:
            try:
                return main(argv)
            except CheckpointWriteError as err:  # disk full, file size limit, permissions
                print(f"{prog}: error: {err}", file=sys.stderr)
                return 1
            except (
                ConfigError,
                CheckpointError,
                FileNotFoundError,
                ImportError,
                ResourceError,
                RunDirError,
            ) as err:
                print(f"{prog}: error: {err}", file=sys.stderr)
                return 2
            except TrainingHalted as err:
                print(f"{prog}: stopped: {err}", file=sys.stderr)
                return 3
            except KeyboardInterrupt as err:
                # TrainingInterrupted (a signal, handled at a step boundary) says what it saved;
                # a bare one (Ctrl-C twice, or a signal outside training) had nothing in flight.
                signum = getattr(err, "signum", signal.SIGINT)
                name = signal.Signals(signum).name
                text = str(err) or f"{name}: stopped; the newest checkpoint, if any, is intact"
                print(f"\n{prog}: {text}", file=sys.stderr)
                return 128 + int(signum)
            except OSError as err:  # e.g. the disk filled while writing the metrics
                print(f"{prog}: error: {err}", file=sys.stderr)
                return 1

        return run

    return wrap
