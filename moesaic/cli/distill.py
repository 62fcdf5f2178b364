"""``moesaic distill --teacher RUN --student-layers N``: distil a trained run into a shallower one.

Mixture-of-students (Rajbhandari et al. 2022, §5): the student has the teacher's architecture,
MoE layers included, with fewer layers; it starts from the teacher's weights where they agree
(its first N layers, embeddings, head) and learns from ``(1 - w) * CE + w * T^2 * KL`` with the
teacher's softened predictions. Staged KD (their §5.2): the teacher's term is switched off after
``--kd-fraction`` of the steps, since a student that keeps imitating a deeper teacher late in
training underfits the data. The run resumes like any training run.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

from moesaic.cli.common import add_run_arguments, friendly_errors, saved_config
from moesaic.cli.train import summary
from moesaic.train.config import (
    ConfigError,
    RunConfig,
    apply_overrides,
    config_from_dict,
)
from moesaic.train.run import read_run_config
from moesaic.train.trainer import Trainer

__all__ = ["main", "student_config"]


@friendly_errors("moesaic distill")
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="moesaic distill", description=__doc__.splitlines()[0].split(": ", 1)[1]
    )
    parser.add_argument("--teacher", type=Path, help="the trained teacher's run directory")
    parser.add_argument("--student-layers", type=int, help="the student's number of layers")
    parser.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (1)")
    parser.add_argument(
        "--weight", type=float, default=0.5, help="the teacher's share w of the loss (0.5)"
    )
    parser.add_argument(
        "--kd-fraction",
        type=float,
        default=0.5,
        help="share of the steps with the teacher's term (staged KD; 1 keeps it throughout)",
    )
    parser.add_argument(
        "--no-init", action="store_true", help="start the student from random weights"
    )
    add_run_arguments(parser, "the student", "train.steps=500")
    args = parser.parse_args(argv)
    if args.resume:
        if args.out is None:
            raise ConfigError("--resume needs --out DIR (the student's run to continue)")
        cfg = saved_config(args.out, args.overrides)
    else:
        if args.teacher is None or args.student_layers is None:
            raise ConfigError("--teacher RUN and --student-layers N are needed")
        if not 0 < args.kd_fraction <= 1:
            raise ConfigError(f"--kd-fraction={args.kd_fraction} must be in (0, 1]")
        cfg = student_config(
            args.teacher,
            args.student_layers,
            args.overrides,
            temperature=args.temperature,
            weight=args.weight,
            kd_fraction=args.kd_fraction,
            init=not args.no_init,
        )
    out = args.out or Path("runs") / f"{cfg.recipe}-{time.strftime('%Y%m%d-%H%M%S')}"
    print(f"run directory: {out}")
    trainer = Trainer(cfg, out, resume=args.resume, progress=not args.no_progress)
    inherited = getattr(trainer.task, "inherited", None)
    if inherited is not None and not args.resume:
        print(f"student starts from the teacher's weights in {len(inherited)} tensors")
    result = trainer.fit()
    print(summary(result, trainer), flush=True)
    return 0


def student_config(
    teacher: Path,
    layers: int,
    overrides: list[str],
    *,
    temperature: float = 1.0,
    weight: float = 0.5,
    kd_fraction: float = 0.5,
    init: bool = True,
) -> RunConfig:
    """The teacher run's config with ``layers`` layers and a ``distill`` section pointing at
    it (KD for the first ``kd_fraction`` of the steps), then ``overrides``."""
    data = read_run_config(teacher)
    if data.get("finetune"):
        raise ConfigError(f"--teacher {teacher} is a fine-tuning run: distil a language model")
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
        raise ConfigError(f"--student-layers={layers} must be an int >= 1")
    data["model"]["n_layers"] = layers
    data["recipe"] = f"{data.get('recipe', 'custom')}-student{layers}"
    data["distill"] = None
    try:
        cfg = apply_overrides(config_from_dict(RunConfig, data), overrides)
        until = max(1, round(kd_fraction * cfg.train.steps))
        return apply_overrides(
            cfg,
            [
                f"distill.teacher={teacher}",
                f"distill.temperature={temperature}",
                f"distill.weight={weight}",
                f"distill.until={until}",
                "distill.schedule=constant",
                f"distill.init_from_teacher={str(init).lower()}",
            ],
        )
    except ValueError as err:
        raise ConfigError(str(err)) from None
