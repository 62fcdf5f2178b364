"""``moesaic report RUN_DIR``: parameters, FLOPs, energy, routing statistics and plots of a run."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from moesaic.cli.common import friendly_errors
from moesaic.metrics.energy import DEVICE_POWER_W, GRID_KG_PER_KWH, PUE, estimate_emissions
from moesaic.metrics.report import build_report
from moesaic.train.config import ConfigError

__all__ = ["main"]


@friendly_errors("moesaic report")
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="moesaic report",
        description="Write RUN_DIR/report.html (self-contained, plots embedded) and "
        "RUN_DIR/report.md (plots beside it as report_*.png) for a run directory of "
        "'moesaic train' or an output directory of 'moesaic compare'. Energy follows Patterson "
        "et al. 2021: hours x devices x average power x PUE, CO2e = energy x grid intensity, "
        "applied to the measured training seconds.",
    )
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    parser.add_argument(
        "--device-preset",
        default="cpu",
        choices=sorted(DEVICE_POWER_W),
        help="average power per device: "
        + ", ".join(f"{k} {v:g} W" for k, v in DEVICE_POWER_W.items())
        + " (default cpu)",
    )
    parser.add_argument("--devices", type=int, default=1, help="number of devices (default 1)")
    parser.add_argument(
        "--avg-power-w", type=float, default=None, help="watts per device; overrides the preset"
    )
    parser.add_argument(
        "--pue",
        default="us_average",
        help="a preset ("
        + ", ".join(f"{k} {v:g}" for k, v in PUE.items())
        + ") or a number >= 1 (default us_average)",
    )
    parser.add_argument(
        "--grid",
        default="us_average",
        help="kgCO2e per kWh: a preset ("
        + ", ".join(f"{k} {v:g}" for k, v in GRID_KG_PER_KWH.items())
        + ") or a number (default us_average)",
    )
    args = parser.parse_args(argv)
    energy = {
        "device": args.device_preset,
        "devices": args.devices,
        "avg_power_w": args.avg_power_w,
        "pue": _number_or_name(args.pue),
        "grid": _number_or_name(args.grid),
    }
    try:
        estimate_emissions(0.0, **energy)  # reject bad energy options before any work
    except (ValueError, TypeError) as err:
        raise ConfigError(str(err)) from None
    report = build_report(args.run_dir, **energy)
    print(report.markdown.split("\n## Training and validation loss")[0].rstrip())
    print(f"\nwrote {report.html_path} ({report.html_path.stat().st_size:,} bytes)")
    print(f"wrote {report.md_path} and {len(report.images)} PNGs beside it")
    return 0


def _number_or_name(value: str) -> str | float:
    try:
        return float(value)
    except ValueError:
        return value
