"""``moesaic skillnet train|eval|retrieve``: SkillNet on text, image, sound, video and code.

moesaic skillnet train --run runs/skillnet              # smoke recipe: pretrain, fine-tune
moesaic skillnet compare --preset default               # the report table (about 20 minutes)
moesaic skillnet eval --run runs/skillnet               # test metrics, chance, parameters
moesaic skillnet retrieve --run runs/skillnet --task t2i_zh --query 三十七
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from moesaic.cli.common import friendly_errors
from moesaic.skillnet.compare import DEFAULT_MODELS, MODELS, compare, comparison_table
from moesaic.skillnet.data import decode_bytes
from moesaic.skillnet.data.common import encode_bytes
from moesaic.skillnet.model import SKILL_SITES
from moesaic.skillnet.pretrain_data import load_pretrain_data
from moesaic.skillnet.run import evaluate_run, format_table, load_run, train_run
from moesaic.skillnet.tasks import PRESET_STEPS, PRESETS, load_task_data
from moesaic.skillnet.train import SkillNetRecipe, queries_and_gallery

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moesaic skillnet", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="action", required=True)
    train = sub.add_parser("train", help="train jointly on every task, then evaluate")
    train.add_argument("--run", type=Path, default=Path("runs/skillnet"), help="run directory")
    train.add_argument("--model", default="skillnet-tiny", help="a registered SkillNet model")
    train.add_argument("--preset", default="smoke", choices=sorted(PRESETS), help="data sizes")
    train.add_argument("--tasks", default=None, help="comma-separated subset of the tasks")
    train.add_argument("--steps", type=int, default=None, help="fine-tuning steps (preset's)")
    train.add_argument(
        "--pretrain-steps", type=int, default=None,
        help="sparse self-supervised pretraining steps before fine-tuning (preset's; 0: none)",
    )  # fmt: skip
    train.add_argument("--batch-size", type=int, default=32)
    train.add_argument("--lr", type=float, default=3e-3)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument(
        "--skill-sites", default=None, help=f"comma-separated subset of {SKILL_SITES}, or 'none'"
    )
    train.add_argument("--general-skill", action="store_true", help="add an always-on skill")
    train.add_argument("--data-dir", type=Path, default=None, help="dataset cache folder")
    cmp = sub.add_parser("compare", help="SkillNet vs dense multitask vs one dense per task")
    cmp.add_argument("--out", type=Path, default=Path("runs/skillnet-compare"))
    cmp.add_argument("--preset", default="smoke", choices=sorted(PRESETS))
    cmp.add_argument("--tasks", default=None, help="comma-separated subset of the tasks")
    cmp.add_argument("--steps", type=int, default=None, help="fine-tuning steps (preset's)")
    cmp.add_argument("--pretrain-steps", type=int, default=None, help="(preset's; 0: none)")
    cmp.add_argument("--workers", type=int, default=2, help="models trained side by side")
    cmp.add_argument(
        "--models", default=",".join(DEFAULT_MODELS),
        help=f"comma-separated subset of {','.join(MODELS)}",
    )  # fmt: skip
    cmp.add_argument("--batch-size", type=int, default=32)
    cmp.add_argument("--seed", type=int, default=0)
    cmp.add_argument("--data-dir", type=Path, default=None, help="dataset cache folder")
    ev = sub.add_parser("eval", help="evaluate a trained run")
    ev.add_argument("--run", type=Path, required=True)
    ev.add_argument("--split", default="test", choices=["val", "test"])
    ret = sub.add_parser("retrieve", help="rank the test gallery of a retrieval task for a query")
    ret.add_argument("--run", type=Path, required=True)
    ret.add_argument("--task", required=True)
    ret.add_argument("--query", required=True)
    ret.add_argument("--top", type=int, default=5)
    return parser


@friendly_errors("moesaic skillnet")
def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        actions = {"train": _train, "compare": _compare, "eval": _eval, "retrieve": _retrieve}
        return actions[args.action](args)
    except ValueError as err:
        print(f"moesaic skillnet: error: {err}", file=sys.stderr)
        return 2


def _recipes(args: argparse.Namespace) -> tuple[SkillNetRecipe, SkillNetRecipe | None]:
    """(fine-tuning recipe, pretraining recipe or None) from the flags and the preset."""
    pre_steps, steps = PRESET_STEPS[args.preset]
    steps = steps if args.steps is None else args.steps
    pre_steps = pre_steps if args.pretrain_steps is None else args.pretrain_steps
    if pre_steps < 0:
        raise ValueError(f"--pretrain-steps={pre_steps} must be >= 0")
    kw = {"batch_size": args.batch_size, "seed": args.seed}
    if hasattr(args, "lr"):  # `compare` keeps the recipe's default
        kw["lr"] = args.lr
    recipe = SkillNetRecipe(steps=steps, **kw)
    return recipe, (SkillNetRecipe(steps=pre_steps, **kw) if pre_steps else None)


def _train(args: argparse.Namespace) -> int:
    recipe, pretrain = _recipes(args)
    overrides = {"general_skill": args.general_skill} if args.general_skill else {}
    if args.skill_sites is not None:
        sites = args.skill_sites.split(",") if args.skill_sites != "none" else []
        overrides["skill_sites"] = frozenset(s.strip() for s in sites)

    def log(record: dict) -> None:
        steps = (pretrain if record["phase"] == "pretrain" else recipe).steps
        if record["step"] % max(1, steps // 10) == 0 or record["step"] == steps:
            losses = " ".join(f"{k[5:]}={v:.3f}" for k, v in record.items() if k[:5] == "loss/")
            print(f"{record['phase']} step {record['step']}/{steps} {record['seconds']:.0f}s "
                  f"{losses}", file=sys.stderr, flush=True)  # fmt: skip

    tasks = tuple(t.strip() for t in args.tasks.split(",")) if args.tasks else None
    result = train_run(
        args.run, model_name=args.model, model_overrides=overrides, recipe=recipe,
        pretrain=pretrain, preset=args.preset, tasks=tasks, data_dir=args.data_dir, log=log,
    )  # fmt: skip
    print(format_table(result))
    print(f"wrote {args.run}/model.safetensors, metrics.jsonl, eval.json, report.md")
    return 0


def _compare(args: argparse.Namespace) -> int:
    recipe, pretrain = _recipes(args)
    tasks = tuple(t.strip() for t in args.tasks.split(",")) if args.tasks else None
    data = load_task_data(tasks, args.preset, args.seed, args.data_dir)
    if pretrain is not None:
        pretrain = (pretrain, load_pretrain_data(data, args.preset, args.seed, args.data_dir))
    models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    result = compare(data, recipe, args.out, pretrain, workers=args.workers, models=models)
    print(comparison_table(result, data))
    print(f"wrote {args.out}/compare.json, compare.md, skills.png")
    return 0


def _eval(args: argparse.Namespace) -> int:
    model, data, _ = load_run(args.run)
    print(format_table(evaluate_run(args.run, model, data, args.split)))
    return 0


@torch.no_grad()
def _retrieve(args: argparse.Namespace) -> int:
    model, data, _ = load_run(args.run)
    if args.task not in data or data[args.task].kind != "retrieve":
        names = sorted(t for t, d in data.items() if d.kind == "retrieve")
        raise ValueError(f"--task={args.task!r} is not one of this run's retrieval tasks {names}")
    split = data[args.task].splits["test"]
    captions, labels, gallery, g_labels = queries_and_gallery(split)
    query = torch.from_numpy(encode_bytes([args.query], model.cfg.text_len))
    q = model.embed_pair(args.task, query, None)[0]
    k = torch.cat([model.embed_pair(args.task, None, gallery[i : i + 256])[1]
                   for i in range(0, len(gallery), 256)])  # fmt: skip
    scores = (q @ k.t())[0]
    caption_of = {int(lab): decode_bytes(c.numpy()) for c, lab in zip(captions, labels)}
    for rank, g in enumerate(scores.topk(min(args.top, len(scores))).indices.tolist(), start=1):
        what = caption_of[int(g_labels[g])]
        if args.task == "t2c":
            what = decode_bytes(gallery[g].numpy()).splitlines()[0]
        print(f"{rank}. item {g} score {float(scores[g]):.3f}: {what}")
    return 0
