"""MoE vs its FLOPs-matched dense baseline, trained on the same batches with the same budget.

The dense model is ``LMConfig.dense_equivalent()``: same width, depth, data, optimizer and steps,
with an FFN ``top_k * d_ff`` wide (plus ``shared_d_ff``, its shared expert) wherever the MoE model
has an MoE layer, so both spend the same FFN FLOPs per token (the MoE additionally pays its router).
Both runs draw identical batches (the sampler is a pure function of seed and batch number) and
evaluate on identical validation windows.

Wall-clock here is training time: the seconds spent in training steps, excluding evaluations and
checkpoint saves, which are measurement overhead that differ between the two runs. Energy is
``ms.metrics.estimate_emissions`` of that time with its defaults (one 65 W CPU, PUE 1.58).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from moesaic.metrics.energy import estimate_emissions
from moesaic.metrics.flops import lm_flops_per_token
from moesaic.train.checkpoint import list_checkpoints, write_atomic
from moesaic.train.config import RunConfig, config_to_dict
from moesaic.train.data import PreparedData, prepare_data
from moesaic.train.recipes import dense_baseline
from moesaic.train.tasks import evaluate
from moesaic.train.trainer import Trainer, TrainResult

__all__ = ["CompareResult", "run_compare", "crossing", "plot_compare"]


@dataclasses.dataclass
class CompareResult:
    out_dir: Path
    summary: dict[str, Any]


def crossing(evals: list[dict[str, Any]], target: float, key: str) -> float | None:
    """``key`` (step or train_s) at which the eval curve first reaches ``target``, interpolated
    linearly between the two evaluations around the crossing; None if it never does."""
    prev = None
    for row in evals:
        if row["val_loss"] <= target:
            if prev is None or prev["val_loss"] == row["val_loss"]:
                return float(row[key])
            frac = (prev["val_loss"] - target) / (prev["val_loss"] - row["val_loss"])
            return prev[key] + frac * (row[key] - prev[key])
        prev = row
    return None


def run_compare(
    cfg: RunConfig,
    out_dir: Path,
    progress: bool = True,
    *,
    data: PreparedData | None = None,
    resume: bool = False,
    on_run_done: Callable[[str, TrainResult], None] | None = None,
) -> CompareResult:
    """Train ``cfg`` and its dense baseline into ``out_dir/{moe,dense}``; write compare.json.

    ``resume`` continues a run that has checkpoints from its newest one (a finished run is not
    trained again); ``data`` is ``prepare_data(cfg.data)`` when the caller already holds it.
    With ``data.holdout_domain`` set, each model's final loss on the held-out domain is in the
    summary beside its (in-domain) validation loss. ``on_run_done(name, result)`` is called
    after each of the two runs (a sweep's progress bar)."""
    _require_matplotlib()
    out_dir.mkdir(parents=True, exist_ok=True)
    data = prepare_data(cfg.data) if data is None else data
    results: dict[str, TrainResult] = {}
    heldout: dict[str, float | None] = {}
    configs = {"moe": cfg, "dense": dense_baseline(cfg)}
    for name, run_cfg in configs.items():
        run_dir = out_dir / name
        again = resume and bool(list_checkpoints(run_dir / "checkpoints"))
        print(f"{'resuming' if again else 'training'} {name}: {run_cfg.recipe}")
        trainer = Trainer(run_cfg, run_dir, resume=again, progress=progress, data=data)
        results[name] = trainer.fit()
        heldout[name] = (
            None
            if data.heldout is None
            else evaluate(trainer.model, data.heldout_batches(run_cfg.data))
        )
        if on_run_done is not None:
            on_run_done(name, results[name])
    summary = _summarize(configs, results, heldout, data.tokenizer.vocab_size)
    write_atomic(out_dir / "compare.json", json.dumps(summary, indent=1))
    plot_compare(summary, out_dir / "compare.png")
    return CompareResult(out_dir=out_dir, summary=summary)


def _train_flops(cfg: RunConfig, vocab: int) -> float:
    """Training FLOPs per token of ``cfg``'s model: the Transformer's formula, or for an LSTM
    run (``cfg.lstm``) the count of the model it builds."""
    if cfg.lstm is None:
        model = dataclasses.replace(cfg.model, vocab_size=vocab)
        return lm_flops_per_token(model, cfg.data.seq_len).train
    from moesaic.metrics import count
    from moesaic.train.tasks import build_model

    with torch.random.fork_rng():
        return count(build_model(cfg, vocab)).train_flops


def _summarize(
    configs: dict[str, RunConfig],
    results: dict[str, TrainResult],
    heldout: dict[str, float | None],
    vocab: int,
):
    moe, dense = results["moe"], results["dense"]
    target = dense.val_loss
    flops = {name: _train_flops(c, vocab) for name, c in configs.items()}
    tokens_per_step = configs["moe"].data.batch_size * configs["moe"].data.seq_len
    runs = {}
    for name, r in results.items():
        train_s = r.evals[-1]["train_s"]
        runs[name] = {
            "config": config_to_dict(configs[name]),
            "evals": r.evals,
            "final_val_loss": r.val_loss,
            "heldout_loss": heldout[name],
            "params_total": r.params.total,
            "params_activated": r.params.activated,
            "train_flops_per_token": flops[name],
            "train_flops": r.steps * tokens_per_step * flops[name],
            "train_s": train_s,
            "energy_kwh": estimate_emissions(train_s / 3600).energy_kwh,
            "step_s": train_s / r.steps,
            "tokens_per_step": tokens_per_step,
        }
    moe_steps = crossing(moe.evals, target, "step")
    moe_secs = crossing(moe.evals, target, "train_s")
    moe_flops = None if moe_steps is None else moe_steps * tokens_per_step * flops["moe"]
    return {
        "dense_final_val_loss": target,
        "moe_final_val_loss": moe.val_loss,
        "moe_steps_to_dense_loss": moe_steps,
        "moe_train_s_to_dense_loss": moe_secs,
        "steps_ratio": None if moe_steps is None else moe_steps / dense.steps,
        "wallclock_ratio": None if moe_secs is None else moe_secs / runs["dense"]["train_s"],
        # dense compute spent / MoE compute needed for the same validation loss
        "flops_speedup": None if not moe_flops else runs["dense"]["train_flops"] / moe_flops,
        "step_cost_ratio": runs["moe"]["step_s"] / runs["dense"]["step_s"],
        "flops_per_token_ratio": flops["moe"] / flops["dense"],
        "runs": runs,
    }


def plot_compare(summary: dict[str, Any], path: Path) -> None:
    """Validation loss against steps, training FLOPs and training seconds, MoE and dense."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), sharey=True)
    for name, run in summary["runs"].items():
        steps = [e["step"] for e in run["evals"]]
        loss = [e["val_loss"] for e in run["evals"]]
        flops = [s * run["tokens_per_step"] * run["train_flops_per_token"] for s in steps]
        secs = [e["train_s"] for e in run["evals"]]
        label = f"{name} ({run['params_total'] / 1e6:.1f}M params)"
        for ax, x in zip(axes, (steps, flops, secs)):
            ax.plot(x, loss, marker="o", markersize=3, label=label)
    for ax, xlabel in zip(axes, ("training steps", "training FLOPs", "training seconds")):
        ax.set_xlabel(xlabel)
        ax.axhline(summary["dense_final_val_loss"], color="grey", lw=0.8, ls="--")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation loss (nats/token)")
    axes[0].legend()
    fig.suptitle("MoE vs dense baseline with equal activated FLOPs per token")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError(
            "moesaic compare draws compare.png with matplotlib, in the 'plot' extra: "
            "pip install 'moesaic[plot]'"
        ) from None
