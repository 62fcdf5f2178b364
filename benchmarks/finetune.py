"""Fine-tuning sparse models, measured: does Artetxe et al.'s fine-tuning gap appear at our scale?

Stages (each skipped when its results exist, so an interrupted run continues):

1. Pre-training: the default MoE recipe and its FLOPs-matched dense baseline on the multi-domain
   corpus, same data and steps (``moesaic compare``).
2. Fine-tuning each on every labelled task: full fine-tuning (MoE with Switch's expert dropout
   0.4, and with 0.1 like the rest of the model; dense with 0.1), and prompt tuning.
3. Knowledge inheritance (CPM-2): a deeper MoE pre-trained from scratch, and again with the
   pre-trained small MoE as teacher (distillation weight decaying linearly to 0); steps to
   reach the from-scratch model's final validation loss.

    python benchmarks/finetune.py --out runs/finetune-bench
    python benchmarks/finetune.py --out runs/finetune-bench --table   # print the tables only

Needs the Debian corpora of the mixture (``moesaic data install``) and the ``finetune`` extra.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moesaic.cli.finetune import finetune_config
from moesaic.train.compare import crossing, run_compare
from moesaic.train.config import apply_overrides
from moesaic.train.recipes import get_recipe
from moesaic.train.trainer import Trainer

TASKS = ("supersense", "fortune", "sentiment-zh")
THREADS: list[str] = []
# name -> (pretrained model, --set overrides of the fine-tuning run)
VARIANTS = {
    "moe, expert dropout 0.4": ("moe", []),
    "moe, expert dropout 0.1": ("moe", ["finetune.expert_dropout=0.1"]),
    "dense": ("dense", []),
    "moe, prompt tuning": ("moe", ["finetune.method=prompt"]),
    "dense, prompt tuning": ("dense", ["finetune.method=prompt"]),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--pretrain-steps", type=int, default=1200)
    p.add_argument("--finetune-steps", type=int, default=400)
    p.add_argument("--inherit-steps", type=int, default=600)
    p.add_argument("--inherit-layers", type=int, default=3, help="the larger model's layers")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument(
        "--threads", type=int, default=0, help="intra-op threads (train.threads; 0: torch's)"
    )
    p.add_argument("--table", action="store_true", help="only print the tables of --out")
    p.add_argument(
        "--stages",
        default="all",
        choices=("all", "students"),
        help="students: only the mixture-of-students stage and its teacher (the from-scratch "
        "deeper MoE of knowledge inheritance), without pre-training or fine-tuning",
    )
    args = p.parse_args(argv)
    out: Path = args.out
    global THREADS
    THREADS = [f"train.threads={args.threads}"]
    if not args.table and args.stages == "students":
        inherit(out, args.inherit_steps, args.inherit_layers, only=("scratch",))
        students(out, args.inherit_steps, args.inherit_layers - 1)
    elif not args.table:
        pretrain(out, args.pretrain_steps)
        for task in args.tasks.split(","):
            for name in VARIANTS:
                finetune(out, task, name, args.finetune_steps)
        inherit(out, args.inherit_steps, args.inherit_layers)
        students(out, args.inherit_steps, args.inherit_layers - 1)
    print(tables(out, args.tasks.split(",")))
    return 0


def _pretrain_cfg(steps: int):
    return apply_overrides(
        get_recipe("lm-moe-tiny"),
        ["data.corpus=mixture", f"train.steps={steps}", "train.checkpoint_every=250", *THREADS],
    )


def pretrain(out: Path, steps: int) -> None:
    if (out / "pretrain" / "compare.json").exists():
        return
    run_compare(_pretrain_cfg(steps), out / "pretrain")


def finetune(out: Path, task: str, name: str, steps: int) -> dict:
    result_file = out / "finetune" / task / _slug(name) / "result.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    model, overrides = VARIANTS[name]
    cfg = finetune_config(
        out / "pretrain" / model,
        task,
        [*overrides, f"train.steps={steps}", "train.eval_every=100", *THREADS],
    )
    run_dir = result_file.parent
    resume = (run_dir / "checkpoints").is_dir()
    print(f"fine-tuning {name} on {task}", file=sys.stderr, flush=True)
    trainer = Trainer(cfg, run_dir, resume=resume)
    result = trainer.fit()
    test = trainer.task.evaluate(trainer.model, trainer.task.batches("test"))
    trained = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    row = {
        "val_acc": result.evals[-1]["val_acc"],
        "test_acc": test["val_acc"],
        "test_loss": test["val_loss"],
        "examples": len(trainer.task.splits["test"][2]),
        "classes": len(trainer.task.classes),
        "trained_params": trained,
        "total_params": sum(p.numel() for p in trainer.model.parameters()),
        "train_s": result.evals[-1]["train_s"],
    }
    result_file.write_text(json.dumps(row, indent=1))
    return row


def _done(result, layers: int) -> str:
    params = {"total": result.params.total, "activated": result.params.activated}
    return json.dumps({"evals": result.evals, "layers": layers, "params": params}, indent=1)


def inherit(out: Path, steps: int, layers: int, only: tuple[str, ...] = ()) -> None:
    base = _pretrain_cfg(steps)
    runs = {
        "scratch": [],
        "inherited": [
            f"distill.teacher={out / 'pretrain' / 'moe'}",
            "distill.weight=0.5",
            f"distill.until={steps}",
            "distill.schedule=linear",
        ],
    }
    for name, extra in runs.items():
        run_dir = out / "inherit" / name
        if (run_dir / "done.json").exists() or (only and name not in only):
            continue
        cfg = apply_overrides(
            base,
            [f"model.n_layers={layers}", f"recipe=lm-moe-{layers}l", "train.eval_every=50", *extra],
        )
        print(f"knowledge inheritance: {name}", file=sys.stderr, flush=True)
        result = Trainer(cfg, run_dir, resume=(run_dir / "checkpoints").is_dir()).fit()
        (run_dir / "done.json").write_text(_done(result, cfg.model.n_layers))


# name -> (the teacher's share w of the loss, start from the teacher's first layers)
STUDENTS = {
    "student": (0.5, True),
    "kd_only": (0.5, False),
    "init_only": (0.0, True),
    "alone": (0.0, False),
}


def students(out: Path, steps: int, layers: int) -> None:
    """Mixture-of-students: the from-scratch deeper MoE of ``inherit`` as teacher, a student one
    layer shallower (same MoE layer kept) with and without the teacher."""
    from moesaic.cli.distill import student_config

    teacher = out / "inherit" / "scratch"
    overrides = [f"train.steps={steps}", "train.eval_every=50", *THREADS]
    # the paper's student is the first; the other three separate what the teacher's weights
    # and its loss each bring
    runs = {
        name: student_config(teacher, layers, overrides, weight=w, init=init)
        for name, (w, init) in STUDENTS.items()
    }
    for name, cfg in runs.items():
        run_dir = out / "students" / name
        if (run_dir / "done.json").exists():
            continue
        print(f"mixture-of-students: {name}", file=sys.stderr, flush=True)
        result = Trainer(cfg, run_dir, resume=(run_dir / "checkpoints").is_dir()).fit()
        (run_dir / "done.json").write_text(_done(result, cfg.model.n_layers))


def tables(out: Path, tasks: list[str]) -> str:
    lines = []
    compare = out / "pretrain" / "compare.json"
    if compare.exists():
        runs = json.loads(compare.read_text())["runs"]
        lines += ["| pre-trained model | parameters | activated | validation loss |"]
        lines += ["|---|---|---|---|"]
        for name, r in runs.items():
            lines.append(
                f"| {name} | {r['params_total']:,} | {int(r['params_activated']):,} | "
                f"{r['final_val_loss']:.4f} |"
            )
        lines.append("")
    last = tasks[-1]
    lines += ["| fine-tuning | " + " | ".join(tasks) + f" | trained / all parameters ({last}) |"]
    lines += ["|---|" + "---|" * len(tasks) + "---|"]
    for name in VARIANTS:
        cells, trained = [], ""
        for task in tasks:
            f = out / "finetune" / task / _slug(name) / "result.json"
            if f.exists():
                r = json.loads(f.read_text())
                cells.append(f"{100 * r['test_acc']:.1f}%")
                trained = f"{r['trained_params']:,} of {r['total_params']:,}"
            else:
                cells.append("-")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {trained} |")
    scratch, inherited = (out / "inherit" / n / "done.json" for n in ("scratch", "inherited"))
    if scratch.exists() and inherited.exists():
        a = json.loads(scratch.read_text())["evals"]
        b = json.loads(inherited.read_text())["evals"]
        target = a[-1]["val_loss"]
        reached = crossing(b, target, "step")
        lines += [
            "",
            "| deeper MoE pre-training | final validation loss | steps to the from-scratch "
            "final loss |",
            "|---|---|---|",
            f"| from scratch | {target:.4f} | {a[-1]['step']} |",
            f"| inheriting from the pre-trained 2-layer MoE | {b[-1]['val_loss']:.4f} | "
            + (f"{reached:.0f}" if reached is not None else "not reached")
            + " |",
        ]
    names = {
        "student": "student: teacher's first layers + staged KD",
        "kd_only": "same student, random start + staged KD",
        "init_only": "same student, teacher's first layers, no KD",
        "alone": "same student, random start, no teacher",
    }
    done = {n: out / "students" / n / "done.json" for n in names}
    done = {n: f for n, f in done.items() if f.exists()}
    if done and scratch.exists():
        lines += ["", "| mixture-of-students | layers | final validation loss | parameters | "]
        lines[-1] += "activated / token |"
        lines += ["|---|---:|---:|---:|---:|"]
        rows = {"teacher (the deeper MoE, from scratch)": scratch}
        rows.update({names[n]: f for n, f in done.items()})
        for label, f in rows.items():
            r = json.loads(f.read_text())
            p = r.get("params")  # absent from runs written before the counts were saved
            total, active = (f"{p['total']:,}", f"{int(p['activated']):,}") if p else ("-", "-")
            lines.append(
                f"| {label} | {r.get('layers', '-')} | {r['evals'][-1]['val_loss']:.4f} | "
                f"{total} | {active} |"
            )
    return "\n".join(lines)


def _slug(name: str) -> str:
    return name.replace(", ", "-").replace(" ", "-").replace(".", "")


if __name__ == "__main__":
    sys.exit(main())
