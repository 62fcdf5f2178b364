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

from moesaic.config import MoEConfig
from moesaic.convert.moefy import moefy
from moesaic.models.lm import LMConfig, MoELM

__all__ = ["upcycled_lm_config", "upcycle_lm"]


UPCYCLED_MOE = MoEConfig(num_experts=8, router="topk", top_k=2)


def upcycled_lm_config(dense: LMConfig, moe: MoEConfig = UPCYCLED_MOE, **fields: Any) -> LMConfig:
    """The MoE config of an upcycled ``dense``: every ``moe_every``-th FFN becomes the MoE layer
    ``moe`` describes, with experts as wide as the dense FFN there; ``fields`` set further
    ``LMConfig`` fields.

    The default router (``topk`` with k=2, renormalised) keeps the upcycled model's output equal
    to the dense model's at step 0 and still gives the router a gradient from the task loss
    (with k=1 the renormalised weight is always 1)."""
    if not isinstance(moe, MoEConfig):
        raise TypeError(f"moe={moe!r} must be an ms.MoEConfig")
    if dense.is_moe:
        raise ValueError(
            f"model.moe.num_experts={dense.moe.num_experts}: the model is already an MoE"
        )
    widths = {dense.ffn_width(i) for i in range(dense.n_layers)}
    if len(widths) != 1:
        raise ValueError(
            f"model.d_ff={dense.d_ff} and model.matched_d_ff={dense.matched_d_ff} differ: an "
            "upcycled LM needs one FFN width (LMConfig has one d_ff for dense and expert layers)"
        )
    cfg = dataclasses.replace(dense, d_ff=widths.pop(), matched_d_ff=None, moe=moe, **fields)
    if cfg.first_dense_layers or cfg.expert_width != cfg.d_ff:
        raise ValueError(
            f"model.first_dense_layers={cfg.first_dense_layers}, model.expert_d_ff="
            f"{cfg.expert_d_ff}: upcycling copies every moe_every-th FFN whole into the experts "
            "(first_dense_layers=0 and expert_d_ff=None)"
        )
    return cfg


def upcycle_lm(dense: MoELM, cfg: LMConfig, noise: float = 0.0, seed: int | None = None) -> MoELM:
    """An ``MoELM(cfg)`` whose experts are copies of ``dense``'s FFNs (plus ``noise``) and whose
    other weights are ``dense``'s; ``cfg`` comes from ``upcycled_lm_config``. Routers start
    from ``MoE``'s initialisation."""
    converted = moefy(
        copy.deepcopy(dense), config=cfg.moe, every=cfg.moe_every, noise=noise, seed=seed
    )
    model = MoELM(cfg)
    model.load_state_dict(converted.state_dict(), strict=True)
    return model.train(dense.training)
