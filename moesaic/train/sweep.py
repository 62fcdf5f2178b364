"""MoE vs dense across model sizes and training budgets: ``moesaic sweep``.

Each point of the sweep is one ``moesaic compare`` (moesaic/train/compare.py) of the base recipe
at one model size and one budget of training steps, in its own directory ``OUT/SIZE-STEPS``.
From each point's two loss curves comes the compute speed-up factor of Artetxe et al. 2021
(their comparison at equal training FLOPs): the dense model's training FLOPs divided by the
FLOPs the MoE needed to reach the dense model's final validation loss, interpolated between
evaluations. Fedus et al. 2022 (Switch, §3)
and Du et al. 2022 (GLaM) report the same comparison as steps and time to a quality threshold.

A sweep resumes where it stopped: a point whose ``compare.json`` holds the same configurations
is reused without training, and a run with checkpoints continues from its newest one (exact
resume), so rerunning the same command finishes an interrupted sweep.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from moesaic.train.checkpoint import write_atomic
from moesaic.train.compare import run_compare
from moesaic.train.config import ConfigError, RunConfig, config_to_dict
from moesaic.train.data import prepare_data
from moesaic.train.recipes import dense_baseline

__all__ = [
    "SWEEP_SIZES",
    "SweepPoint",
    "parse_size",
    "point_config",
    "sweep_points",
    "run_sweep",
    "plot_sweep",
]

# Named sizes: d_model, layers and heads; the FFN (and each expert) is 4 * d_model wide. At the
# sweep recipe's 128-token windows their training FLOPs per token span 11x (0.30M to 3.41M).
SWEEP_SIZES: dict[str, dict[str, int]] = {
    "xs": {"d_model": 32, "n_layers": 2, "n_heads": 2},
    "s": {"d_model": 48, "n_layers": 2, "n_heads": 2},
    "m": {"d_model": 64, "n_layers": 3, "n_heads": 2},
    "l": {"d_model": 96, "n_layers": 4, "n_heads": 4},
    "xl": {"d_model": 128, "n_layers": 4, "n_heads": 4},
}
_CUSTOM = re.compile(r"(\d+)x(\d+)")  # WIDTHxLAYERS, e.g. 64x3


@dataclasses.dataclass(frozen=True)
class SweepPoint:
    size: str
    steps: int
    cfg: RunConfig
    out_dir: Path


def parse_size(name: str) -> dict[str, int]:
    """A named size of ``SWEEP_SIZES`` or ``WIDTHxLAYERS`` (heads: one per 32 channels)."""
    if name in SWEEP_SIZES:
        return dict(SWEEP_SIZES[name])
    match = _CUSTOM.fullmatch(name)
    if match is None:
        raise ConfigError(
            f"--sizes: {name!r} is not one of {list(SWEEP_SIZES)} or WIDTHxLAYERS (e.g. 64x3)"
        )
    width, layers = int(match[1]), int(match[2])
    if width < 8 or layers < 1:
        raise ConfigError(f"--sizes: {name!r} needs a width >= 8 and at least one layer")
    return {"d_model": width, "n_layers": layers, "n_heads": max(1, width // 32)}


def point_config(base: RunConfig, size: Mapping[str, int], steps: int) -> RunConfig:
    """``base`` at one model size, trained ``steps`` steps: ten evaluations along the way (the
    loss curve the speed-up is read from), checkpoints every quarter, warm-up at most a tenth."""
    model = dataclasses.replace(base.model, **size, d_ff=4 * size["d_model"], expert_d_ff=None)
    tenth = max(1, steps // 10)
    return dataclasses.replace(
        base,
        model=model,
        optim=dataclasses.replace(base.optim, warmup_steps=min(base.optim.warmup_steps, tenth)),
        train=dataclasses.replace(
            base.train,
            steps=steps,
            eval_every=tenth,
            checkpoint_every=max(1, steps // 4),
            sample_tokens=0,
        ),
    )


def sweep_points(
    base: RunConfig, sizes: Mapping[str, Mapping[str, int]], budgets: Sequence[int], out: Path
) -> list[SweepPoint]:
    """Every size at every budget, smallest first, each with its directory under ``out``."""
    _check_base(base)
    if not sizes:
        raise ConfigError("--sizes: at least one size is needed")
    if not budgets or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in budgets):
        raise ConfigError(f"--budgets={list(budgets)} must be step counts >= 1")
    if len(set(budgets)) != len(budgets):
        raise ConfigError(f"--budgets={list(budgets)} repeats a budget")
    points = []
    for name, size in sizes.items():
        for steps in sorted(budgets):
            try:
                cfg = point_config(base, size, steps)
            except ValueError as err:
                raise ConfigError(f"size {name!r}: {err}") from None
            m = cfg.model
            if not any(m.layer_experts(i) for i in range(m.n_layers)):
                raise ConfigError(
                    f"size {name!r} has no MoE layer ({m.n_layers} layer(s) with "
                    f"model.moe_every={m.moe_every}): the MoE would equal its dense baseline"
                )
            points.append(SweepPoint(name, steps, cfg, out / f"{name}-{steps}"))
    return points


def run_sweep(
    base: RunConfig,
    out: Path,
    sizes: Mapping[str, Mapping[str, int]],
    budgets: Sequence[int],
    progress: bool = True,
) -> dict[str, Any]:
    """Run (or reuse, or resume) every point; write ``sweep.json``, ``sweep.md`` and
    ``sweep.png`` to ``out`` and return the summary."""
    points = sweep_points(base, sizes, budgets, out)
    expected = [_expected(point) for point in points]
    for point, configs in zip(points, expected):  # before any training: refuse another sweep's
        _check_same_configs(point, configs)
    out.mkdir(parents=True, exist_ok=True)
    data = prepare_data(base.data)
    bar = tqdm(
        total=2 * sum(p.steps for p in points),
        unit="step",
        desc="sweep",
        disable=not progress,
        dynamic_ncols=True,
        leave=True,
    )
    rows = []
    try:
        for i, (point, configs) in enumerate(zip(points, expected), 1):
            summary = _finished(point, configs)
            label = f"point {i}/{len(points)}: size {point.size}, {point.steps} steps"
            if summary is not None:
                bar.write(f"{label}: reused {point.out_dir / 'compare.json'}")
                bar.update(2 * point.steps)
            else:
                bar.write(f"{label} -> {point.out_dir}")
                summary = run_compare(
                    point.cfg,
                    point.out_dir,
                    progress=progress,
                    data=data,
                    resume=True,
                    on_run_done=lambda _name, result: bar.update(result.steps),
                ).summary
            rows.append(_row(point, summary))
    finally:
        bar.close()
    result = {"recipe": base.recipe, "holdout_domain": base.data.holdout_domain, "points": rows}
    write_atomic(out / "sweep.json", json.dumps(result, indent=1))
    write_atomic(out / "sweep.md", sweep_table(result) + "\n")
    plot_sweep(result, out / "sweep.png")
    return result


def _check_base(base: RunConfig) -> None:
    others = [
        name for name in ("lstm", "vision", "finetune", "retgen") if getattr(base, name) is not None
    ]
    if others:
        raise ConfigError(
            f"moesaic sweep compares Transformer language models; recipe {base.recipe!r} has a "
            f"{others[0]} section"
        )
    if base.model.moe is None:
        raise ConfigError(
            f"moesaic sweep needs an MoE recipe (recipe {base.recipe!r} has model.moe=None)"
        )


def _expected(point: SweepPoint) -> dict[str, Any]:
    """The point's two configurations as compare.json and config.json store them."""
    configs = {"moe": point.cfg, "dense": dense_baseline(point.cfg)}
    return {name: json.loads(json.dumps(config_to_dict(c))) for name, c in configs.items()}


def _check_same_configs(point: SweepPoint, expected: dict[str, Any]) -> None:
    """A point directory that holds runs of other configurations is another sweep's."""
    for name, config in expected.items():
        path = point.out_dir / name / "config.json"
        if path.exists() and json.loads(path.read_text()) != config:
            raise ConfigError(
                f"{path.parent} holds a run of another configuration than this sweep's "
                f"{point.size}-{point.steps} point; pass another --out (or remove it)"
            )


def _finished(point: SweepPoint, expected: dict[str, Any]) -> dict[str, Any] | None:
    """The point's compare.json summary when it exists for exactly ``expected``'s
    configurations."""
    path = point.out_dir / "compare.json"
    if not path.exists():
        return None
    summary = json.loads(path.read_text())
    if any(summary["runs"][name]["config"] != expected[name] for name in expected):
        return None
    return summary


def _row(point: SweepPoint, s: dict[str, Any]) -> dict[str, Any]:
    moe, dense = s["runs"]["moe"], s["runs"]["dense"]
    return {
        "size": point.size,
        "d_model": point.cfg.model.d_model,
        "n_layers": point.cfg.model.n_layers,
        "steps": point.steps,
        "dir": str(point.out_dir),
        "params_total": {"moe": moe["params_total"], "dense": dense["params_total"]},
        "params_activated": {"moe": moe["params_activated"], "dense": dense["params_activated"]},
        "train_flops_per_token": {
            "moe": moe["train_flops_per_token"],
            "dense": dense["train_flops_per_token"],
        },
        "dense_train_flops": dense["train_flops"],
        "val_loss": {"moe": moe["final_val_loss"], "dense": dense["final_val_loss"]},
        "heldout_loss": {"moe": moe["heldout_loss"], "dense": dense["heldout_loss"]},
        "flops_speedup": s["flops_speedup"],
        "steps_ratio": s["steps_ratio"],
        "wallclock_ratio": s["wallclock_ratio"],
        "train_s": {"moe": moe["train_s"], "dense": dense["train_s"]},
        "energy_kwh": {"moe": moe["energy_kwh"], "dense": dense["energy_kwh"]},
    }


def _x(value: float | None, fmt: str = "{:.2f}x") -> str:
    return "not reached" if value is None else fmt.format(value)


def _size_label(row: dict[str, Any]) -> str:
    shape = f"{row['d_model']}x{row['n_layers']}"
    return shape if row["size"] == shape else f"{row['size']} ({shape})"


def sweep_table(result: dict[str, Any]) -> str:
    """The sweep as a Markdown table, one row per point."""
    held = result["holdout_domain"]
    lines = [
        "| size | steps | params MoE / dense | dense train FLOPs | val loss MoE / dense | "
        + (f"held-out ({held}) MoE / dense | " if held else "")
        + "FLOPs speed-up | MoE s to dense loss / dense s | energy kWh MoE / dense |",
        "|---|---:|---:|---:|---:|" + ("---:|" if held else "") + "---:|---:|---:|",
    ]
    for r in result["points"]:
        p, v, h, e = r["params_total"], r["val_loss"], r["heldout_loss"], r["energy_kwh"]
        lines.append(
            f"| {_size_label(r)} | {r['steps']} | "
            f"{p['moe'] / 1e6:.2f}M / {p['dense'] / 1e6:.2f}M | {r['dense_train_flops']:.3g} | "
            f"{v['moe']:.4f} / {v['dense']:.4f} | "
            + (f"{h['moe']:.4f} / {h['dense']:.4f} | " if held else "")
            + f"{_x(r['flops_speedup'])} | {_x(r['wallclock_ratio'])} | "
            f"{e['moe']:.2e} / {e['dense']:.2e} |"
        )
    return "\n".join(lines)


def plot_sweep(result: dict[str, Any], path: Path) -> None:
    """Speed-up factor against the dense model's training FLOPs, one line per budget; beside
    it the MoE's validation-loss gain in and out of domain."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    held = result["holdout_domain"]
    fig, axes = plt.subplots(1, 2 if held else 1, figsize=(12 if held else 6.5, 4.2))
    axes = list(axes) if held else [axes]
    for steps in sorted({r["steps"] for r in result["points"]}):
        rows = [r for r in result["points"] if r["steps"] == steps]
        reached = [r for r in rows if r["flops_speedup"] is not None]
        ax = axes[0]
        ax.plot(
            [r["dense_train_flops"] for r in reached],
            [r["flops_speedup"] for r in reached],
            marker="o",
            label=f"{steps} steps",
        )
        for r in reached:
            ax.annotate(r["size"], (r["dense_train_flops"], r["flops_speedup"]), fontsize=8)
        if held:
            flops = [r["dense_train_flops"] for r in rows]
            gain_in = [r["val_loss"]["dense"] - r["val_loss"]["moe"] for r in rows]
            gain_out = [r["heldout_loss"]["dense"] - r["heldout_loss"]["moe"] for r in rows]
            line = axes[1].plot(flops, gain_in, marker="o", label=f"in domain, {steps} steps")
            axes[1].plot(
                flops,
                gain_out,
                marker="s",
                ls="--",
                color=line[0].get_color(),
                label=f"held out ({held}), {steps} steps",
            )
    axes[0].axhline(1.0, color="grey", lw=0.8, ls="--")
    axes[0].set_ylabel("speed-up: dense FLOPs / MoE FLOPs to the same loss")
    axes[0].set_title("MoE compute speed-up at equal activated FLOPs")
    if held:
        axes[1].axhline(0.0, color="grey", lw=0.8, ls="--")
        axes[1].set_ylabel("dense loss - MoE loss (nats/token)")
        axes[1].set_title("MoE's loss gain, in and out of domain")
    if not any(r["flops_speedup"] for r in result["points"]):
        axes[0].text(0.5, 0.5, "the MoE reached the dense loss nowhere", ha="center",
                     transform=axes[0].transAxes)  # fmt: skip
    for ax in axes:
        if ax.lines[1:]:  # a curve besides the reference line: FLOPs span decades
            ax.set_xscale("log")
        ax.set_xlabel("dense training FLOPs")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
