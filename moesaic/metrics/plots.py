"""The report's figures, as PNG bytes (matplotlib, Agg backend; the ``plot`` extra).

Each function takes plain rows as read from a run directory (metrics.jsonl, routing.jsonl,
affinity.json) and returns the PNG, so the report can both embed it and save it.
"""

from __future__ import annotations

import io
from collections import defaultdict
from typing import Any

__all__ = [
    "require_matplotlib",
    "loss_curves",
    "routing_panels",
    "routing_curves",
    "router_comparison",
    "expert_load",
    "sampled_affinity",
    "affinity_maps",
]

_DPI = 100


def require_matplotlib():
    """``matplotlib.pyplot`` with the Agg backend, or an ImportError naming the extra."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError(
            "moesaic report draws its plots with matplotlib, in the 'plot' extra: "
            "pip install 'moesaic[plot]'"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


TITLE_SIZE = 13  # panel titles: readable in the HTML report at its 1200-pixel width


def _png(fig) -> bytes:
    plt = require_matplotlib()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=_DPI)
    plt.close(fig)
    return buf.getvalue()


def loss_curves(runs: dict[str, list[dict[str, Any]]]) -> bytes:
    """Training loss (line) and validation loss (markers) against step, one colour per run."""
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (name, rows) in enumerate(runs.items()):
        color = f"C{i}"
        train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
        if train:
            ax.plot(*zip(*train), color=color, lw=1, alpha=0.7, label=f"{name} train")
        if val:
            ax.plot(*zip(*val), color=color, marker="o", ms=4, ls="--", label=f"{name} val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)


def _by_layer(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    layers: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        layers[r["layer"]].append(r)
    return dict(layers)


def routing_panels(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(key, title) of the routing panels worth drawing for ``rows``."""
    keys = [
        ("load_cv", "load coefficient of variation"),
        ("entropy", "router entropy (nats)"),
        ("dropped_fraction", "dropped fraction"),
        ("dead_experts", "dead experts"),
    ]
    if not any(r["dropped_fraction"] for r in rows):
        keys.remove(("dropped_fraction", "dropped fraction"))
    return keys


def sampled_affinity(affinity: dict[str, Any]) -> tuple[list[str], dict[str, list]]:
    """(labels, layer -> rows) of affinity.json without the labels no layer saw a token of."""
    sampled = [
        i
        for i in range(len(affinity["labels"]))
        if any(sum(counts[i]) for counts in affinity["layers"].values())
    ]
    labels = [affinity["labels"][i] for i in sampled]
    layers = {name: [counts[i] for i in sampled] for name, counts in affinity["layers"].items()}
    return labels, layers


def router_comparison(runs: dict[str, list[dict[str, Any]]]) -> bytes:
    """Load CV and router entropy over training, one line per run (each the mean over its MoE
    layers at every logged step): routers trained on the same model and data side by side."""
    plt = require_matplotlib()
    keys = [("load_cv", "load coefficient of variation"), ("entropy", "router entropy (nats)")]
    fig, axes = plt.subplots(1, len(keys), figsize=(10, 4), squeeze=False)
    axes = axes[0]
    for i, (name, rows) in enumerate(runs.items()):
        by_step: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for r in rows:
            by_step[r["step"]].append(r)
        steps = sorted(by_step)
        for ax, (key, _) in zip(axes, keys):
            mean = [sum(r[key] for r in by_step[s]) / len(by_step[s]) for s in steps]
            ax.plot(steps, mean, color=f"C{i % 10}", ls="-" if i < 10 else "--", label=name)
    for ax, (_, title) in zip(axes, keys):
        ax.set_title(title, fontsize=TITLE_SIZE)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_yscale("symlog", linthresh=0.1)
    axes[-1].legend(fontsize=7, ncol=2)
    return _png(fig)


def routing_curves(rows: list[dict[str, Any]]) -> bytes:
    """Load CV, router entropy, dropped fraction and dead experts over training, per layer (no
    dropped-fraction panel for a run that never dropped a token: dropless, or capacity never
    reached)."""
    plt = require_matplotlib()
    keys = routing_panels(rows)
    fig, axes = plt.subplots(1, len(keys), figsize=(3.75 * len(keys), 3.4))
    for layer, layer_rows in _by_layer(rows).items():
        steps = [r["step"] for r in layer_rows]
        for ax, (key, _) in zip(axes, keys):
            ax.plot(steps, [r[key] for r in layer_rows], marker=".", label=layer)
    for ax, (_, title) in zip(axes, keys):
        ax.set_title(title, fontsize=TITLE_SIZE)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return _png(fig)


def expert_load(rows: list[dict[str, Any]]) -> bytes:
    """Share of each expert's assignments at every logged step (rows: steps), per layer."""
    plt = require_matplotlib()
    layers = _by_layer(rows)
    fig, axes = plt.subplots(1, len(layers), figsize=(6 * len(layers), 3.6), squeeze=False)
    for ax, (layer, layer_rows) in zip(axes[0], layers.items()):
        share = [_normalise(r["tokens_per_expert"]) for r in layer_rows]
        first, last, E = layer_rows[0]["step"], layer_rows[-1]["step"], len(share[0])
        half = (last - first) / max(1, len(share) - 1) / 2 or 0.5  # rows centred on their step
        extent = (-0.5, E - 0.5, last + half, first - half)
        image = ax.imshow(share, aspect="auto", interpolation="nearest", extent=extent)
        _integer_ticks(ax, y=True)
        ax.set_xlabel("expert")
        ax.set_ylabel("step")
        ax.set_title(f"{layer}: share of assignments per expert", fontsize=TITLE_SIZE)
        fig.colorbar(image, ax=ax)
    return _png(fig)


def affinity_maps(affinity: dict[str, Any]) -> bytes:
    """Label-by-expert heatmaps (affinity.json): each label's assignments as shares of experts,
    for the labels that were sampled (a domain with no training tokens has no row)."""
    plt = require_matplotlib()
    labels, layers = sampled_affinity(affinity)
    fig, axes = plt.subplots(
        1, len(layers), figsize=(6 * len(layers), 0.5 * len(labels) + 2), squeeze=False
    )
    for ax, (layer, counts) in zip(axes[0], layers.items()):
        image = ax.imshow(
            [_normalise(row) for row in counts], aspect="auto", interpolation="nearest"
        )
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        _integer_ticks(ax)
        ax.set_xlabel("expert")
        ax.set_title(f"{layer}: label -> expert share", fontsize=TITLE_SIZE)
        fig.colorbar(image, ax=ax)
    return _png(fig)


def _integer_ticks(ax, y: bool = False) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if y:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def _normalise(counts: list[float]) -> list[float]:
    total = sum(counts)
    return [c / total if total else 0.0 for c in counts]
