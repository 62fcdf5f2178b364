"""Recipes of the LSTM-MoE language model (Shazeer et al. 2017, §2-3), registered in ``RECIPES``.

``lstm-moe`` trains ``lstm-moe-tiny`` (two LSTM layers with a noisy top-2 MoE of 16 experts
between them) on the default corpus with ``lm-moe-tiny``'s data, optimizer and steps, so the
two recipes see the same batches at the same activated FLOPs per token; ``lstm-dense`` is its
dense twin of equal activated FLOPs (an FFN as wide as the two active experts together).
"""

from __future__ import annotations

import dataclasses

from moesaic.config import MoEConfig
from moesaic.models.registry import model_config
from moesaic.train.config import DataConfig, OptimConfig, RunConfig, TrainConfig
from moesaic.train.recipes import dense_baseline, lm_moe_tiny, recipe

__all__: list[str] = []


@recipe("lstm-moe")
def lstm_moe() -> RunConfig:
    """The LSTM-MoE (``lstm-moe-tiny``) with ``lm-moe-tiny``'s data, optimizer and steps."""
    lm = lm_moe_tiny()
    return RunConfig(
        recipe="lstm-moe",
        lstm=model_config("lstm-moe-tiny"),
        data=lm.data,
        optim=lm.optim,
        train=lm.train,
    )


@recipe("lstm-dense")
def lstm_dense() -> RunConfig:
    """``lstm-moe``'s dense twin: same data and budget, same activated FLOPs per token."""
    return dataclasses.replace(dense_baseline(lstm_moe()), recipe="lstm-dense")


@recipe("lstm-moe-test")
def lstm_moe_test() -> RunConfig:
    """Seconds-long LSTM-MoE run for tests and smoke checks (4 experts, noisy top-2)."""
    moe = MoEConfig(num_experts=4, top_k=2, router="noisy_topk", aux_loss_weight=0.1)
    return RunConfig(
        recipe="lstm-moe-test",
        lstm=model_config("lstm-moe-tiny", d_model=32, d_ff=64, moe=moe),
        data=DataConfig(corpus="stdlib", seq_len=32, batch_size=8, eval_batches=4),
        optim=OptimConfig(lr=3e-3, warmup_steps=5),
        train=TrainConfig(
            steps=30, eval_every=10, checkpoint_every=10, log_every=5, sample_tokens=16
        ),
    )
