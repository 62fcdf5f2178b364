"""Switch Transformer router (Fedus, Zoph, Shazeer 2021): top-1, y = p_i*(x) E_i*(x).

Section 2.1, eqs. 1-2. The kept weight is the raw softmax probability of the chosen expert, which
is what makes the router differentiable; the input gets multiplicative jitter in training.
``TopKRouter``'s DeepSeek options apply: ``score_func="sigmoid"`` keeps the chosen expert's
sigmoid score as its weight, ``balance_rate`` balances it without an aux loss.
"""

from __future__ import annotations

from moesaic.routing.registry import register_router
from moesaic.routing.topk import TopKRouter

__all__ = ["SwitchRouter"]


@register_router("switch")
class SwitchRouter(TopKRouter):
    """Top-1 routing with aux loss ``E * sum_i f_i P_i`` (the layer multiplies by alpha).

    Jitter defaults to eps = 1e-2 (x * U(1 - eps, 1 + eps) in training), as in Mesh TensorFlow's
    Switch implementation.
    """

    default_top_k = 1
    default_jitter = 1e-2

    def __init__(self, d_model: int, num_experts: int, top_k: int | None = None, **kwargs) -> None:
        if top_k not in (None, 1):
            raise ValueError(f"top_k={top_k} must be 1 for router='switch' (use 'topk' for k > 1)")
        if kwargs.pop("normalize", False):
            raise ValueError("normalize=True is not available for router='switch'")
        super().__init__(d_model, num_experts, 1, normalize=False, **kwargs)
