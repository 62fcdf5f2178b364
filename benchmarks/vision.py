"""Vision MoE evidence (docs/vision.md): V-MoE vs ViT and Sparse-MLP vs MLP-Mixer at equal
activated FLOPs on Fashion-MNIST, V-MoE's capacity curve with and without Batch Prioritized
Routing, and contrastive pre-training followed by a linear probe on MNIST 5k, MoE vs dense.

Every run goes through the command line a user types (``moesaic train``, ``moesaic vision``);
a finished run is reused, so an interrupted benchmark continues where it stopped.

    python benchmarks/vision.py --out runs/vision [--steps 2500] [--contrastive-steps 600]

``--quick`` (seconds per run, for the test) trains a few steps on 512 images.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CLASSIFY = ("vmoe-fashion", "vit-fashion", "sparse-mlp-fashion", "mixer-fashion")
CONTRASTIVE = ("sparse-mlp-fashion", "mixer-fashion", "vmoe-fashion", "vit-fashion")


def moesaic(*args: str) -> str:
    cmd = [sys.executable, "-m", "moesaic", *args]
    print("$ moesaic " + " ".join(args), flush=True)
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    print(done.stdout, end="", flush=True)
    return done.stdout


def train(run: Path, recipe: str, sets: list[str]) -> dict:
    """Train ``recipe`` into ``run`` unless it already finished; its test metrics."""
    if not (run / "test.json").exists():
        args = ["train", "--recipe", recipe, "--run-dir", str(run), "--no-progress"]
        if (run / "checkpoints").is_dir():
            args.append("--auto-resume")
        for s in sets:
            args += ["--set", s]
        moesaic(*args)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in metrics if "val_loss" in m]
    out = json.loads((run / "test.json").read_text())
    out["train_s"] = evals[-1].get("train_s")
    return out


def params(run: Path) -> tuple[int, float]:
    from moesaic.metrics import count
    from moesaic.train.vision import load_vision_run

    c = count(load_vision_run(run).model)
    return c.total_params, c.activated_params


def classify_table(rows: list[tuple]) -> str:
    """Markdown: (recipe, total params, activated per patch, test accuracy, training s) rows."""
    lines = [
        "",
        "| recipe | parameters | activated per patch | test accuracy | training s |",
        "|---|---:|---:|---:|---:|",
    ]
    for recipe, total, active, acc, secs in rows:
        lines.append(f"| {recipe} | {total:,} | {active:,.0f} | {100 * acc:.2f}% | {secs:.0f} |")
    return "\n".join(lines)


def probe_table(rows: list[tuple]) -> str:
    """Markdown: (backbone recipe, pair retrieval, probe accuracy, training s) rows."""
    lines = [
        "",
        "| backbone | pair retrieval (test) | MNIST-5k linear probe | training s |",
        "|---|---:|---:|---:|",
    ]
    for recipe, pair, probe, secs in rows:
        lines.append(f"| {recipe} | {100 * pair:.2f}% | {100 * probe:.2f}% | {secs:.0f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/vision"))
    parser.add_argument("--steps", type=int, default=2500)
    parser.add_argument("--contrastive-steps", type=int, default=600)
    parser.add_argument("--threads", type=int, default=0, help="train.threads (0: torch's)")
    parser.add_argument("--quick", action="store_true", help="a few steps on 512 images")
    args = parser.parse_args()
    common = [f"train.threads={args.threads}"]
    curve = []
    if args.quick:
        args.steps, args.contrastive_steps = 4, 2
        common += ["vision.train_examples=512", "data.eval_batches=1", "data.batch_size=32",
                   "train.eval_every=2", "train.checkpoint_every=2"]  # fmt: skip
        curve = ["--batches", "1"]
    rows = []
    for recipe in CLASSIFY:
        run = args.out / recipe
        m = train(run, recipe, [f"train.steps={args.steps}", *common])
        total, active = params(run)
        rows.append((recipe, total, active, m["val_acc"], m["train_s"]))
    print(classify_table(rows))
    for recipe in ("vmoe-fashion", "sparse-mlp-fashion"):
        moesaic("vision", "capacity-curve", "--run", str(args.out / recipe), *curve)
    probes = []
    for recipe in CONTRASTIVE:
        run = args.out / f"{recipe}-simclr"
        sets = ["vision.objective=contrastive", f"train.steps={args.contrastive_steps}", *common]
        m = train(run, recipe, sets)
        moesaic("vision", "probe", "--run", str(run))
        probe = json.loads((run / "probe.json").read_text())
        probes.append((recipe, m["val_acc"], probe["accuracy"], m["train_s"]))
    print(probe_table(probes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
