"""The classic mixtures of experts on Fashion-MNIST, side by side in one process.

Rows:

- the dense MLP 784-H-H-10, and a copy of it trained as many epochs more (the control for the
  hard mixture, whose experts start from it and train that much more);
- MILE: a linear softmax gate over E such MLPs, trained jointly on the competitive mixture
  likelihood;
- MELE: k-means on the pixels, one such MLP per cluster;
- hard MoE: k-means on the dense model's first-layer features, each expert a copy of its second
  layer, all sharing its frozen output layer;
- MELE and hard MoE again with balanced k-means.

Then specialists on the generalist's (the dense model's) confusable clusters, their eq. 5
combination, a student distilled from that combination, and the generalist trained on as many
more examples. Expert training of MELE and hard MoE is timed serially (one process, one thread)
and in 2 worker processes of one thread each, and the two results are compared parameter by
parameter.

    python benchmarks/classic.py                    # 60k train, 10k test, E=4, 8 epochs, seed 0
    python benchmarks/classic.py --seeds 0 1 2      # accuracy rows for each seed
    python benchmarks/classic.py --train 5000 --epochs 2 --out /tmp/classic.json   # quick
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # python benchmarks/<name>.py

import torch

from moesaic.cli.timing import environment
from moesaic.data.images import FASHION_CLASSES_EN
from moesaic.train import classic_runs as runs

__all__ = ["main"]


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _timed(setup: runs.ClassicSetup, data: dict, name: str, run, args: tuple) -> tuple:
    """The serial result and the serial vs 2-process timing of one mixture's experts."""
    load_before = _load()
    serial, r_serial = run(setup, data, *args)
    parallel, r_par = run(dataclasses.replace(setup, processes=2), data, *args)
    return r_serial, {
        "model": name, "serial_s": r_serial["train_s"], "parallel_s": r_par["train_s"],
        "identical": _same(serial, parallel), "load_before": load_before, "load_after": _load(),
        "train_counts": r_serial["train_counts"],
    }  # fmt: skip


def _mixtures(setup: runs.ClassicSetup, data: dict, timing: bool, only_timing: bool) -> dict:
    """Every mixture row of one seed; with ``timing`` also the 2-process runs."""
    dense, r_dense = runs.run_dense(setup, data)
    out = {"dense": r_dense, "timing": []}
    if not only_timing:
        out["dense, trained longer"] = runs.run_dense_longer(setup, data, dense)[1]
        out["MILE"] = runs.run_mile(setup, data)[1]
    for name, run in (("MELE", runs.run_mele), ("hard MoE", runs.run_hard)):
        args = (dense,) if run is runs.run_hard else ()
        if timing:
            out[name], t = _timed(setup, data, name, run, args)
            out["timing"].append(t)
        else:
            out[name] = run(setup, data, *args)[1]
        if not only_timing:
            out[f"{name}, balanced"] = run(dataclasses.replace(setup, balanced=True), data, *args)[
                1
            ]
    if only_timing:
        return out
    out["specialists"] = runs.run_specialists(setup, data, dense)
    if timing:  # first seed: also one specialist on exactly T-shirt/top, pullover, coat, shirt
        tops = dataclasses.replace(setup, subsets=(runs.TOPS,))
        out["specialist on tops"] = runs.run_specialists(tops, data, dense)
    return out


def _accuracy_table(per_seed: list[dict]) -> list[str]:
    names = ["dense", "dense, trained longer", "MILE", "MELE", "MELE, balanced", "hard MoE",
             "hard MoE, balanced"]  # fmt: skip
    seeds = " | ".join(f"seed {s['seed']}" for s in per_seed)
    lines = [f"| model | {seeds} | mean | parameters | activated per image | NMI (seed "
             f"{per_seed[0]['seed']}) | train s (seed {per_seed[0]['seed']}) |",
             "|---" * (len(per_seed) + 6) + "|"]  # fmt: skip
    for name in names:
        accs = [s["rows"][name]["accuracy"] for s in per_seed]
        r = per_seed[0]["rows"][name]
        nmi = f"{r['nmi']:.3f}" if "nmi" in r else "-"
        cells = " | ".join(f"{a:.4f}" for a in accs)
        lines.append(f"| {name} | {cells} | {sum(accs) / len(accs):.4f} | {r['params']:,} | "
                     f"{r['activated']:,} | {nmi} | {r['train_s']:.1f} |")  # fmt: skip
    return lines


def _class_table(r: dict) -> list[str]:
    E = len(r["table"][0])
    lines = [f"**{r['name']}** (NMI {r['nmi']:.3f}; test images of each class per expert)", "",
             "| class | " + " | ".join(f"expert {e}" for e in range(E)) + " |",
             "|---" * (E + 1) + "|"]  # fmt: skip
    for c, row in enumerate(r["table"]):
        lines.append(f"| {FASHION_CLASSES_EN[c]} | " + " | ".join(map(str, row)) + " |")
    return lines + [""]


def _with_tops(r: dict) -> list[dict]:
    """The specialists' clusters, then T-shirt/top, pullover, coat, shirt unless one of them."""
    tops = r["tops"]
    return r["clusters"] + ([] if any(c["classes"] == tops["classes"] for c in r["clusters"])
                            else [tops])  # fmt: skip


def _specialist_table(per_seed: list[dict]) -> list[str]:
    runs_ = [(s["seed"], s["rows"][k]) for s in per_seed for k in ("specialists",
             "specialist on tops") if k in s["rows"]]  # fmt: skip
    lines = ["| seed | rows | generalist | generalist + specialists | distilled student | "
             "generalist trained longer | generalist errors | fixed | broken |",
             "|---" * 9 + "|"]  # fmt: skip
    for seed, r in runs_:
        o = r["overall"]
        specs = "; ".join("{" + ", ".join(FASHION_CLASSES_EN[c] for c in sub) + "}"
                          for sub in r["subsets"])  # fmt: skip
        lines.append(f"| {seed} | specialists: {specs}; control trained {r['longer_epochs']} "
                     f"more epochs | | | | | | | |")  # fmt: skip
        lines.append(f"| {seed} | all 10 classes | {o['generalist']:.4f} | "
                     f"{o['generalist + specialists']:.4f} | {o['distilled student']:.4f} | "
                     f"{o['generalist, trained longer']:.4f} | | | |")  # fmt: skip
        for c in _with_tops(r):
            a = c["accuracy"]
            lines.append(f"| {seed} | {', '.join(c['classes'])} ({c['n_test']}) | "
                         f"{a['generalist']:.4f} | {a['generalist + specialists']:.4f} | "
                         f"{a['distilled student']:.4f} | {a['generalist, trained longer']:.4f} | "
                         f"{c['errors_generalist']} | "
                         f"{c['fixed']} | {c['broken']} |")  # fmt: skip
    return lines


def _timing_table(rows: dict) -> list[str]:
    lines = ["| experts of | serial s (1 process, 1 thread) | 2 processes x 1 thread, s | "
             "speed-up | parallel == serial | load avg before | after | train images per "
             "expert |", "|---" * 8 + "|"]  # fmt: skip
    for t in rows["timing"]:
        lines.append(f"| {t['model']} | {t['serial_s']:.1f} | {t['parallel_s']:.1f} | "
                     f"{t['serial_s'] / t['parallel_s']:.2f}x | {t['identical']} | "
                     f"{t['load_before']} | {t['load_after']} | {t['train_counts']} |")  # fmt: skip
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", type=int, default=60000)
    p.add_argument("--test", type=int, default=10000)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--progress", action="store_true")
    p.add_argument(
        "--timing-only", action="store_true", help="only serial vs 2-process expert training"
    )
    p.add_argument("--out", type=Path, default=None, help="write every result as JSON here")
    args = p.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    per_seed = []
    for i, seed in enumerate(args.seeds):
        setup = runs.ClassicSetup(
            n_train=args.train, n_test=args.test, experts=args.experts, epochs=args.epochs,
            seed=seed, progress=args.progress,
        )  # fmt: skip
        data = runs.load_data(setup)
        if args.timing_only:
            rows = _mixtures(setup, data, timing=True, only_timing=True)
            print(f"{environment()}; {_now()}; train {args.train}, E={args.experts}, "
                  f"{args.epochs} epochs\n")  # fmt: skip
            print("\n".join(_timing_table(rows)))
            return 0
        per_seed.append({"seed": seed, "rows": _mixtures(setup, data, i == 0, False)})
        print(f"seed {seed} done at {time.perf_counter() - start:.0f} s", file=sys.stderr)
    first = per_seed[0]["rows"]
    lines = [f"{environment()}; {_now()}; "
             f"train {args.train}, test {args.test}, E={args.experts}, {args.epochs} epochs, "
             f"total {time.perf_counter() - start:.0f} s", ""]  # fmt: skip
    lines += _accuracy_table(per_seed) + [""]
    for name in ("MILE", "MELE", "hard MoE", "hard MoE, balanced"):
        lines += _class_table(first[name])
    lines += _timing_table(first)
    lines += [""] + _specialist_table(per_seed)
    print("\n".join(lines))
    if args.out is not None:
        args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)},
                                        "per_seed": per_seed}, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
