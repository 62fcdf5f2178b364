"""``moesaic classic``: the classic mixtures of experts on Fashion-MNIST.

``mile`` (gate and experts trained together, Jacobs et al. 1991), ``mele`` (k-means on the
pixels, one expert per cluster), ``hard`` (k-means on a dense model's trunk features, experts
sharing its output layer; Gross et al. 2017) and ``specialists`` (Hinton et al. 2015, §5), each
beside the dense baseline of one expert's size.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moesaic.cli.common import friendly_errors
from moesaic.train.config import ConfigError

__all__ = ["main"]

MODES = ("mile", "mele", "hard", "specialists")
# option -> ClassicSetup field
FIELDS = {
    "train": "n_train", "test": "n_test", "hidden": "hidden", "experts": "experts",
    "epochs": "epochs", "batch_size": "batch_size", "lr": "lr", "seed": "seed",
    "processes": "processes", "clusters": "clusters", "spec_epochs": "spec_epochs",
    "temperature": "temperature", "top_n": "top_n", "combine_steps": "combine_steps",
}  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    from moesaic.train.classic_runs import ClassicSetup

    d = ClassicSetup()
    p = argparse.ArgumentParser(
        prog="moesaic classic",
        description="Classic mixtures of experts on Fashion-MNIST (Debian dataset-fashion-mnist)"
        ", each beside a dense MLP 784-H-H-10 of one expert's size.",
    )
    p.add_argument("mode", choices=MODES, help="mile | mele | hard | specialists")
    p.add_argument("--train", type=int, default=d.n_train, help=f"training images ({d.n_train})")
    p.add_argument("--test", type=int, default=d.n_test, help=f"test images ({d.n_test})")
    p.add_argument("--hidden", type=int, default=d.hidden, help=f"H ({d.hidden})")
    p.add_argument("--experts", type=int, default=d.experts, help=f"experts ({d.experts})")
    p.add_argument("--epochs", type=int, default=d.epochs, help=f"epochs ({d.epochs})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"({d.batch_size})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"Adam learning rate ({d.lr})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"({d.seed})")
    p.add_argument("--balanced", action="store_true", help="balanced k-means (mele, hard)")
    p.add_argument(
        "--processes", type=int, default=d.processes, help="worker processes for the experts"
    )
    p.add_argument(
        "--clusters", type=int, default=d.clusters, help=f"k for specialists ({d.clusters})"
    )
    p.add_argument(
        "--subset",
        dest="subsets",
        action="append",
        default=[],
        type=_classes,
        metavar="C,C,...",
        help="a specialist's classes, e.g. 0,2,4,6 (repeatable; default: clustering)",
    )
    p.add_argument("--spec-epochs", type=int, default=d.spec_epochs, help=f"({d.spec_epochs})")
    p.add_argument("--temperature", type=float, default=d.temperature, help="student's T")
    p.add_argument("--top-n", type=int, default=d.top_n, help="generalist classes that activate")
    p.add_argument("--combine-steps", type=int, default=d.combine_steps, help="eq. 5 steps")
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: fastest for these small MLPs)"
    )
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


@friendly_errors("moesaic classic")
def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from moesaic.train import classic_runs as runs

    fields = {f: getattr(args, a) for a, f in FIELDS.items()}
    try:
        setup = runs.ClassicSetup(
            **fields,
            subsets=tuple(args.subsets),
            balanced=args.balanced,
            progress=not args.no_progress,
        )
    except (ValueError, TypeError) as err:
        raise ConfigError(f"--{_option(str(err))}") from None
    if args.threads < 1:
        raise ConfigError(f"--threads={args.threads} must be >= 1")
    if args.json is not None and not args.json.parent.is_dir():
        raise ConfigError(f"--json={args.json}: folder {args.json.parent} does not exist")
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        result = _run(args, setup)
    finally:
        torch.set_num_threads(threads)
    if args.json is not None:
        record = {"setup": dataclasses.asdict(setup), "mode": args.mode, "results": result}
        args.json.write_text(json.dumps(record, indent=1))
    return 0


def _run(args: argparse.Namespace, setup: Any) -> Any:
    from moesaic.train import classic_runs as runs

    data = runs.load_data(setup)
    dense, dense_result = runs.run_dense(setup, data)
    if args.mode == "specialists":
        result: Any = runs.run_specialists(setup, data, dense)
        print(_specialist_report(result))
    else:
        if args.mode == "mile":
            _, mixture = runs.run_mile(setup, data)
        elif args.mode == "mele":
            _, mixture = runs.run_mele(setup, data)
        else:
            _, mixture = runs.run_hard(setup, data, dense)
        result = [dense_result, mixture]
        print(_mixture_report(result))
    return result


def _classes(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(c) for c in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not class numbers like 0,2,4,6") from None


def _option(message: str) -> str:
    """A ClassicSetup message with its field named as the option (n_train=5 -> train=5)."""
    if message.startswith("subsets["):
        return "subset " + message.split("=", 1)[1]
    for option, field in FIELDS.items():
        if message.startswith(f"{field}="):
            return option.replace("_", "-") + message[len(field) :]
    return message


def _mixture_report(results: list[dict[str, Any]]) -> str:
    lines = ["| model | test accuracy | parameters | activated per image | train s | NMI |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        nmi = f"{r['nmi']:.3f}" if "nmi" in r else "-"
        lines.append(f"| {r['name']} | {r['accuracy']:.4f} | {r['params']:,} | "
                     f"{r['activated']:,} | {r['train_s']:.1f} | {nmi} |")  # fmt: skip
    table = results[-1].get("table")
    if table:
        from moesaic.data.images import FASHION_CLASSES_EN

        lines += ["", "test images of each class (rows) per expert (columns):"]
        lines += [f"{FASHION_CLASSES_EN[c]:>12} " + " ".join(f"{n:5d}" for n in row)
                  for c, row in enumerate(table)]  # fmt: skip
    return "\n".join(lines)


def _with_tops(r: dict) -> list[dict]:
    """The specialists' clusters, then T-shirt/top, pullover, coat, shirt unless one of them."""
    tops = r["tops"]
    return r["clusters"] + ([] if any(c["classes"] == tops["classes"] for c in r["clusters"])
                            else [tops])  # fmt: skip


def _specialist_report(r: dict[str, Any]) -> str:
    names = list(r["overall"])
    lines = ["| test accuracy | " + " | ".join(names) + " | generalist errors | fixed | broken |",
             "|---" * (len(names) + 4) + "|"]  # fmt: skip
    lines.append("| all classes | " + " | ".join(f"{r['overall'][k]:.4f}" for k in names)
                 + " | | | |")  # fmt: skip
    for c in _with_tops(r):
        acc = " | ".join(f"{c['accuracy'][k]:.4f}" for k in names)
        lines.append(f"| {', '.join(c['classes'])} ({c['n_test']}) | {acc} | "
                     f"{c['errors_generalist']} | {c['fixed']} | {c['broken']} |")  # fmt: skip
    return "\n".join(lines)
