"""Measured FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` on a real call.

The cross-check of the analytic counts in ``count.py``. torch 2.13's counter has no formula for
the CPU flash-attention kernel (``aten._scaled_dot_product_flash_attention_for_cpu``, what
``scaled_dot_product_attention`` runs on CPU), so its attention would read as zero FLOPs; we
register torch's own SDPA formulas for it.

Known differences from the analytic training FLOPs (3x forward): flash attention's backward
recomputes the scores, which the counter books (2.5x the attention forward, not 2x), and the
counter ignores in-place ``addmm_``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils import flop_counter

__all__ = ["measure_flops"]

_aten = torch.ops.aten


def _sdpa_cpu(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query, key, value)


def _sdpa_cpu_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


def _cpu_attention_formulas() -> dict[Any, Callable[..., int]]:
    formulas = {}
    for name, formula in (
        ("_scaled_dot_product_flash_attention_for_cpu", _sdpa_cpu),
        ("_scaled_dot_product_flash_attention_for_cpu_backward", _sdpa_cpu_backward),
    ):
        op = getattr(_aten, name, None)
        if op is not None and op not in flop_counter.flop_registry:
            formulas[op] = formula
    return formulas


def measure_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """Total FLOPs ``fn(*args, **kwargs)`` executes, counted by ``FlopCounterMode``.

    Example::

        >>> flops = measure_flops(model, idx_BS)  # forward
        >>> flops = measure_flops(lambda: model.loss(x, y).backward())  # a training step
    """
    mode = flop_counter.FlopCounterMode(display=False, custom_mapping=_cpu_attention_formulas())
    with mode:
        fn(*args, **kwargs)
    return mode.get_total_flops()
