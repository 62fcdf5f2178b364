"""``moesaic extract --run DIR --task NAME --out DIR``: a task's sub-network as a run of its own.

The run must route by task in every MoE layer (``lm-taskmoe``); its tasks are the domains of its
corpus, in the trainer's id order (sorted names). The output is a dense run (TaskMoE,
Kudugunta et al. 2021, "Beyond Distillation") that ``moesaic eval``, ``generate`` and
``report`` read.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

from moesaic.cli.common import friendly_errors
from moesaic.data import load_corpus
from moesaic.inference.extract import extract, task_experts
from moesaic.layer import MoE
from moesaic.train.config import ConfigError
from moesaic.train.run import load_run, write_run

__all__ = ["main", "task_names"]


def task_names(corpus: str) -> list[str]:
    """The task (domain) names of ``corpus`` by id: sorted, as the trainer numbers them."""
    return sorted({d.domain for d in load_corpus(corpus)})


@friendly_errors("moesaic extract")
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moesaic extract", description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a task-routed run directory")
    parser.add_argument("--task", required=True, help="a domain name of the run's corpus")
    parser.add_argument("--out", type=Path, required=True, help="new run directory to write")
    args = parser.parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()):
        parser.error(f"--out={args.out} must be a new or empty directory")
    run = load_run(args.run)
    names = task_names(run.cfg.data.corpus)
    if args.task not in names:
        raise ConfigError(
            f"--task={args.task!r} is not one of {names} (the domains of "
            f"data.corpus={run.cfg.data.corpus!r})"
        )
    task = names.index(args.task)
    try:
        sub = extract(run.model, task)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{args.run}: {err}") from None
    kept = {
        f"blocks.{i}": task_experts(b.ffn, task)[0]
        for i, b in enumerate(run.model.blocks)
        if isinstance(b.ffn, MoE)
    }
    cfg = dataclasses.replace(run.cfg, recipe=f"{run.cfg.recipe}-{args.task}", model=sub.cfg)
    write_run(args.out, cfg, sub, run.tokenizer, run.step)
    record = {"source": str(args.run), "task": args.task, "task_id": task, "experts": kept}
    (args.out / "extract.json").write_text(json.dumps(record, indent=1))
    params = sum(p.numel() for p in sub.parameters())
    full = sum(p.numel() for p in run.model.parameters())
    print(
        f"wrote {args.out}: task {args.task!r} (id {task}), experts per layer {kept}, "
        f"{params:,} parameters of {full:,}"
    )
    return 0
