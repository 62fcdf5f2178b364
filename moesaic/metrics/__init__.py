"""Accounting and insight: parameters, FLOPs per token, energy and CO2e, routing logs, reports.

>>> import moesaic as ms
>>> c = ms.metrics.count(model)            # total / activated params, FLOPs per token
>>> ms.metrics.estimate_emissions(hours=2.0, device="a100", devices=8, pue="google")
"""

from moesaic.metrics.count import ModelCount, count, task_experts
from moesaic.metrics.energy import (
    DEVICE_POWER_W,
    GRID_KG_PER_KWH,
    PUE,
    EnergyEstimate,
    co2e_kg,
    energy_kwh,
    estimate_emissions,
)
from moesaic.metrics.flop_counter import measure_flops
from moesaic.metrics.flops import FlopsPerToken, lm_flops_per_token
from moesaic.metrics.params import ParameterCount, count_parameters
from moesaic.metrics.report import Report, RunSummary, build_report, summarize_run
from moesaic.metrics.routing_log import RoutingLog, read_routing

__all__ = [
    "ParameterCount",
    "count_parameters",
    "FlopsPerToken",
    "lm_flops_per_token",
    "ModelCount",
    "count",
    "task_experts",
    "measure_flops",
    "DEVICE_POWER_W",
    "PUE",
    "GRID_KG_PER_KWH",
    "EnergyEstimate",
    "energy_kwh",
    "co2e_kg",
    "estimate_emissions",
    "RoutingLog",
    "read_routing",
    "Report",
    "RunSummary",
    "build_report",
    "summarize_run",
]
