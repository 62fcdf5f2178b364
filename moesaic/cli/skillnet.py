"""``moesaic skillnet train|eval|retrieve``: SkillNet on text, image, sound, video and code.

moesaic skillnet train --run runs/skillnet              # the smoke recipe, all six tasks
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
from moesaic.data.skillnet import decode_bytes
from moesaic.data.skillnet.common import encode_bytes
from moesaic.models.skillnet import SKILL_SITES
from moesaic.skillnet.compare import compare, comparison_table
from moesaic.skillnet.run import evaluate_run, format_table, load_run, train_run
from moesaic.skillnet.tasks import PRESETS, load_task_data
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
    train.add_argument("--steps", type=int, default=300)
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
    cmp.add_argument("--steps", type=int, default=300)
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


def _train(args: argparse.Namespace) -> int:
    recipe = SkillNetRecipe(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed
    )
    overrides = {"general_skill": args.general_skill} if args.general_skill else {}
    if args.skill_sites is not None:
        sites = args.skill_sites.split(",") if args.skill_sites != "none" else []
        overrides["skill_sites"] = frozenset(s.strip() for s in sites)
    every = max(1, args.steps // 10)

    def log(record: dict) -> None:
        if record["step"] % every == 0 or record["step"] == args.steps:
            losses = " ".join(f"{k[5:]}={v:.3f}" for k, v in record.items() if k[:5] == "loss/")
            print(f"step {record['step']}/{args.steps} {record['seconds']:.0f}s {losses}",
                  file=sys.stderr, flush=True)  # fmt: skip

    tasks = tuple(t.strip() for t in args.tasks.split(",")) if args.tasks else None
    result = train_run(
        args.run, model_name=args.model, model_overrides=overrides, recipe=recipe,
        preset=args.preset, tasks=tasks, data_dir=args.data_dir, log=log,
    )  # fmt: skip
    print(format_table(result))
    print(f"wrote {args.run}/model.safetensors, metrics.jsonl, eval.json, report.md")
    return 0


def _compare(args: argparse.Namespace) -> int:
    recipe = SkillNetRecipe(steps=args.steps, batch_size=args.batch_size, seed=args.seed)
    tasks = tuple(t.strip() for t in args.tasks.split(",")) if args.tasks else None
    data = load_task_data(tasks, args.preset, args.seed, args.data_dir)
    result = compare(data, recipe, args.out)
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
