"""Sparse upcycling of moesaic's own language model: a dense ``MoELM`` -> an MoE ``MoELM``.

``upcycle_lm`` runs ``moefy`` on the dense model's ``DenseFFN`` layers that the MoE config puts
experts in, then loads the result into a freshly built ``MoELM`` of that config with
``strict=True``: the converted model is an ordinary MoE LM (same parameter names, same
checkpoints, ``moesaic train --resume`` continues it).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from moesaic._validate import check_positive_int
from moesaic.convert.moefy import moefy
from moesaic.models.lm import LMConfig, MoELM

__all__ = ["upcycled_lm_config", "upcycle_lm"]


def upcycled_lm_config(
    dense: LMConfig,
    num_experts: int = 8,
    router: str = "topk",
    top_k: int = 2,
    **fields: Any,
) -> LMConfig:
    """The MoE config of an upcycled ``dense``: every ``moe_every``-th FFN gets ``num_experts``
    experts as wide as the dense FFN there; ``fields`` set further ``LMConfig`` fields.

    The default router (``topk`` with k=2, renormalised) keeps the upcycled model's output equal
    to the dense model's at step 0 and still gives the router a gradient from the task loss
    (with k=1 the renormalised weight is always 1)."""
    check_positive_int("num_experts", num_experts)
    if dense.is_moe:
        raise ValueError(f"model.num_experts={dense.num_experts}: the model is already an MoE")
    widths = {dense.ffn_width(i) for i in range(dense.n_layers)}
    if len(widths) != 1:
        raise ValueError(
            f"model.d_ff={dense.d_ff} and model.matched_d_ff={dense.matched_d_ff} differ: an "
            "upcycled LM needs one FFN width (LMConfig has one d_ff for dense and expert layers)"
        )
    return dataclasses.replace(
        dense,
        d_ff=widths.pop(),
        matched_d_ff=None,
        num_experts=num_experts,
        router=router,
        top_k=top_k,
        **fields,
    )


def upcycle_lm(dense: MoELM, cfg: LMConfig, noise: float = 0.0, seed: int | None = None) -> MoELM:
    """An ``MoELM(cfg)`` whose experts are copies of ``dense``'s FFNs (plus ``noise``) and whose
    other weights are ``dense``'s; ``cfg`` comes from ``upcycled_lm_config``. Routers start
    from ``MoE``'s initialisation."""
    converted = moefy(
        copy.deepcopy(dense),
        num_experts=cfg.num_experts,
        router=cfg.router,
        every=cfg.moe_every,
        noise=noise,
        seed=seed,
        top_k=cfg.top_k,
        capacity_factor=cfg.capacity_factor,
        drop_policy=cfg.drop_policy,
        aux_loss_weight=cfg.aux_loss_weight,
        z_loss_weight=cfg.z_loss_weight,
        router_options=cfg.router_options or None,
    )
    model = MoELM(cfg)
    model.load_state_dict(converted.state_dict(), strict=True)
    return model.train(dense.training)
