"""Accounting: parameter counts (activated vs total) and FLOPs per token."""

from moesaic.metrics.flops import FlopsPerToken, lm_flops_per_token
from moesaic.metrics.params import ParameterCount, count_parameters

__all__ = ["ParameterCount", "count_parameters", "FlopsPerToken", "lm_flops_per_token"]
