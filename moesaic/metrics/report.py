"""``moesaic report RUN_DIR``: one self-contained HTML page and its Markdown twin.

Reads a run directory (config.json, tokenizer.json, metrics.jsonl, routing.jsonl,
affinity.json) or a ``moesaic compare`` output (compare.json with moe/ and dense/ runs) and
writes ``report.html`` (every plot embedded as a base64 PNG: no external reference) and
``report.md`` with the plots saved beside it as ``report_*.png``.

Contents: parameters, FLOPs per token, measured training time, energy and CO2e (``energy.py``,
Patterson et al. 2021) per model; routing statistics per MoE layer; loss curves; for a compare
run, validation loss against training FLOPs and seconds; load balance over training; the
label-by-expert heatmaps.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
from pathlib import Path
from typing import Any

from moesaic.metrics import plots
from moesaic.metrics.count import ModelCount, count
from moesaic.metrics.energy import EnergyEstimate, estimate_emissions
from moesaic.metrics.routing_log import AFFINITY_FILE, ROUTING_FILE, read_routing

__all__ = ["RunSummary", "Report", "summarize_run", "build_report"]


@dataclasses.dataclass
class RunSummary:
    """One training run as the report sees it."""

    name: str
    run_dir: Path
    recipe: str
    steps: int
    tokens: int  # tokens trained on
    final_val_loss: float | None
    train_s: float | None  # measured seconds in training steps
    count: ModelCount
    energy: EnergyEstimate | None
    metrics: list[dict[str, Any]]
    routing: list[dict[str, Any]]
    affinity: dict[str, Any] | None

    @property
    def train_flops(self) -> float:
        return self.tokens * self.count.train_flops


@dataclasses.dataclass
class Report:
    html_path: Path
    md_path: Path
    images: list[Path]
    runs: list[RunSummary]
    markdown: str


def summarize_run(run_dir: Path, name: str = "run", **energy_options: Any) -> RunSummary:
    """Read ``run_dir`` and count its model; ``energy_options`` go to ``estimate_emissions``."""
    import torch

    from moesaic.data import tokenizer_from_json
    from moesaic.train.config import RunConfig, config_from_dict
    from moesaic.train.tasks import build_model

    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{run_dir} is not a run directory: {config_path} is missing")
    cfg = config_from_dict(RunConfig, json.loads(config_path.read_text()))
    with torch.random.fork_rng():  # weights do not matter for counting; leave the RNG alone
        if cfg.vision is not None:  # an image run: "tokens" are patches
            from moesaic.train.vision import ImageTask

            task = ImageTask(cfg)
            task.prepare(run_dir, is_main=False)
            model = task.build_model(None)
            seq_len = getattr(model, "backbone", model).cfg.num_patches
        else:
            vocab = tokenizer_from_json((run_dir / "tokenizer.json").read_text()).vocab_size
            model = build_model(cfg, vocab)  # MoELM, or LSTMMoE for an lstm run
            seq_len = cfg.data.seq_len
    metrics = _read_jsonl(run_dir / "metrics.jsonl")
    evals = [r for r in metrics if "val_loss" in r]
    steps = max((r["step"] for r in metrics), default=0)
    train_s = evals[-1]["train_s"] if evals and "train_s" in evals[-1] else None
    affinity_path = run_dir / AFFINITY_FILE
    return RunSummary(
        name=name,
        run_dir=run_dir,
        recipe=cfg.recipe,
        steps=steps,
        tokens=steps * cfg.data.batch_size * seq_len,
        final_val_loss=evals[-1]["val_loss"] if evals else None,
        train_s=train_s,
        # attention FLOPs depend on the window; image and LSTM models have none
        count=count(model, seq_len=seq_len if cfg.vision is None and cfg.lstm is None else None),
        energy=None if train_s is None else estimate_emissions(train_s / 3600, **energy_options),
        metrics=metrics,
        routing=read_routing(run_dir / ROUTING_FILE),
        affinity=json.loads(affinity_path.read_text()) if affinity_path.exists() else None,
    )


def build_report(
    run_dir: Path,
    *,
    device: str = "cpu",
    devices: int = 1,
    avg_power_w: float | None = None,
    pue: str | float = "us_average",
    grid: str | float = "us_average",
) -> Report:
    """Write ``run_dir/report.html``, ``run_dir/report.md`` and ``run_dir/report_*.png``.

    The energy arguments are those of ``estimate_emissions``, applied to each run's measured
    training seconds.
    """
    plots.require_matplotlib()
    run_dir = Path(run_dir)
    energy = dict(device=device, devices=devices, avg_power_w=avg_power_w, pue=pue, grid=grid)
    compare = _compare_summary(run_dir)
    if compare is not None:
        runs = [summarize_run(run_dir / n, n, **energy) for n in ("moe", "dense")]
    else:
        runs = [summarize_run(run_dir, "run", **energy)]
    figures = _figures(run_dir, runs, compare)
    images = []
    for slug, _, png in figures:
        images.append(run_dir / f"report_{slug}.png")
        images[-1].write_bytes(png)
    sections = _sections(runs, compare)
    markdown = _markdown(run_dir, sections, figures)
    (run_dir / "report.md").write_text(markdown)
    recipes = " vs ".join(dict.fromkeys(r.recipe for r in runs))
    (run_dir / "report.html").write_text(_html(run_dir, recipes, sections, figures))
    return Report(run_dir / "report.html", run_dir / "report.md", images, runs, markdown)


def _compare_summary(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "compare.json"
    has_runs = all((run_dir / n / "config.json").exists() for n in ("moe", "dense"))
    return json.loads(path.read_text()) if path.exists() and has_runs else None


def _figures(run_dir: Path, runs: list[RunSummary], compare: dict | None):
    """(slug, caption, png bytes) of every plot the data allows."""
    figures = [("loss", "Training and validation loss", plots.loss_curves(_curves(runs)))]
    if compare is not None:
        from moesaic.train.compare import plot_compare

        path = run_dir / "report_compare.png"
        plot_compare(compare, path)
        caption = "MoE vs dense: validation loss against steps, training FLOPs and seconds"
        figures.append(("compare", caption, path.read_bytes()))
    for run in runs:
        suffix = "" if len(runs) == 1 else f"_{run.name}"
        if run.routing:
            balance = f"{run.name}: load balance over training"
            figures.append((f"routing{suffix}", balance, plots.routing_curves(run.routing)))
            load = f"{run.name}: expert load per logged step"
            figures.append((f"load{suffix}", load, plots.expert_load(run.routing)))
        if run.affinity and run.affinity["layers"]:
            caption = f"{run.name}: label-by-expert affinity (logged steps, rows normalised)"
            figures.append((f"affinity{suffix}", caption, plots.affinity_maps(run.affinity)))
    return figures


def _curves(runs: list[RunSummary]) -> dict[str, list[dict[str, Any]]]:
    return {r.name: r.metrics for r in runs}


Table = tuple[str, list[str], list[list[str]]]  # title, header, rows


def _sections(runs: list[RunSummary], compare: dict | None) -> list[Table]:
    """The tables the HTML and Markdown writers share; a table without data is left out."""
    tables = [_accounting(runs), _energy(runs), _routing(runs), _compare(compare)]
    return [t for t in tables if t is not None and t[2]]


def _accounting(runs: list[RunSummary]) -> Table:
    header = [
        "model", "recipe", "params total", "activated / token", "fwd FLOPs / token",
        "train FLOPs / token", "steps", "tokens", "train FLOPs", "train s", "final val loss",
        "energy kWh", "CO2e g",
    ]  # fmt: skip
    rows = []
    for r in runs:
        c, e = r.count, r.energy
        rows.append([
            r.name, r.recipe, f"{c.total_params / 1e6:.3f}M", f"{c.activated_params / 1e6:.3f}M",
            f"{c.forward_flops / 1e6:.3f}M", f"{c.train_flops / 1e6:.3f}M", str(r.steps),
            f"{r.tokens:,}", f"{r.train_flops:.3e}", _fmt(r.train_s, ".1f"),
            _fmt(r.final_val_loss, ".4f"), _fmt(e and e.energy_kwh, ".3g"),
            _fmt(e and e.co2e_kg * 1000, ".3g"),
        ])  # fmt: skip
    return ("Parameters, FLOPs and energy", header, rows)


def _energy(runs: list[RunSummary]) -> Table | None:
    e = next((r.energy for r in runs if r.energy is not None), None)
    if e is None:
        return None
    row = [f"{e.devices} x {e.avg_power_w:g} W", f"{e.pue:g}", f"{e.kg_co2e_per_kwh:g}"]
    return ("Energy assumptions", ["devices x power", "PUE", "kgCO2e/kWh"], [row])


def _routing(runs: list[RunSummary]) -> Table:
    header = [
        "model", "layer", "step", "load CV", "mean load CV", "entropy", "dropped",
        "dead experts",
    ]  # fmt: skip
    rows = [_routing_row(r.name, layer, rows) for r in runs for layer, rows in _layers(r)]
    return ("Routing per MoE layer (last logged step; mean load CV over training)", header, rows)


def _compare(compare: dict | None) -> Table | None:
    if compare is None:
        return None
    header = ["FLOPs/token ratio", "step cost ratio", "MoE steps to dense loss (share)"]
    ratio = compare.get("steps_ratio")
    row = [
        f"{compare['flops_per_token_ratio']:.3f}",
        f"{compare['step_cost_ratio']:.2f}",
        "not reached" if ratio is None else f"{ratio:.2f}",
    ]
    return ("MoE vs dense", header, [row])


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _layers(run: RunSummary):
    layers: dict[str, list] = {}
    for row in run.routing:
        layers.setdefault(row["layer"], []).append(row)
    return layers.items()


def _routing_row(name: str, layer: str, rows: list[dict[str, Any]]) -> list[str]:
    last = rows[-1]
    mean_cv = sum(r["load_cv"] for r in rows) / len(rows)
    return [
        name, layer, str(last["step"]), f"{last['load_cv']:.3f}", f"{mean_cv:.3f}",
        f"{last['entropy']:.3f}", f"{last['dropped_fraction']:.3f}", str(last["dead_experts"]),
    ]  # fmt: skip


def _markdown(run_dir: Path, sections, figures) -> str:
    lines = [f"# moesaic report: {run_dir.name}", ""]
    for title, header, rows in sections:
        lines += [f"## {title}", "", "| " + " | ".join(header) + " |"]
        lines.append("|" + "---|" * len(header))
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        lines.append("")
    for slug, caption, _ in figures:
        lines += [f"## {caption}", "", f"![{caption}](report_{slug}.png)", ""]
    return "\n".join(lines)


_STYLE = (
    "body{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}"
    "table{border-collapse:collapse;margin-bottom:1.5em}"
    "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
    "th{background:#f3f3f3}img{max-width:100%}"
)


def _html(run_dir: Path, recipes: str, sections, figures) -> str:
    esc = html.escape
    title = f"moesaic report: {recipes} ({run_dir.name})"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(title)}</title><style>{_STYLE}</style></head>",
        f"<body><h1>{esc(title)}</h1>",
    ]
    for title, header, rows in sections:
        parts.append(f"<h2>{esc(title)}</h2><table><tr>")
        parts.append("".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>")
        for row in rows:
            parts.append("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>")
        parts.append("</table>")
    for slug, caption, png in figures:
        data = base64.b64encode(png).decode("ascii")
        parts.append(
            f'<h2>{esc(caption)}</h2><img id="{slug}" alt="{esc(caption)}" '
            f'src="data:image/png;base64,{data}">'
        )
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
