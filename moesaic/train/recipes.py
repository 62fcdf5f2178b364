"""Recipes: named Python functions returning a ``RunConfig``.

``moesaic train --recipe NAME`` runs one; ``--set`` then changes single fields.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from moesaic.models.registry import model_config
from moesaic.train.config import (
    DataConfig,
    FinetuneConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
)

__all__ = [
    "RECIPES",
    "recipe",
    "get_recipe",
    "DEFAULT_RECIPE",
    "dense_baseline",
    "finetune_defaults",
]

RECIPES: dict[str, Callable[[], RunConfig]] = {}
DEFAULT_RECIPE = "lm-moe-tiny"


def recipe(name: str) -> Callable[[Callable[[], RunConfig]], Callable[[], RunConfig]]:
    def wrap(fn: Callable[[], RunConfig]) -> Callable[[], RunConfig]:
        RECIPES[name] = fn
        return fn

    return wrap


def get_recipe(name: str) -> RunConfig:
    if name not in RECIPES:
        raise ValueError(f"recipe {name!r} is not one of {sorted(RECIPES)}")
    return RECIPES[name]()


def dense_baseline(cfg: RunConfig) -> RunConfig:
    """``cfg`` with its model replaced by the dense model of equal activated FLOPs per token
    (the ``lstm`` section's model for an LSTM run)."""
    if cfg.lstm is not None:
        return dataclasses.replace(
            cfg, recipe=f"{cfg.recipe}-dense", lstm=cfg.lstm.dense_equivalent()
        )
    return dataclasses.replace(
        cfg, recipe=f"{cfg.recipe}-dense", model=cfg.model.dense_equivalent()
    )


@recipe("lm-moe-tiny")
def lm_moe_tiny() -> RunConfig:
    """The default: a small Switch-style MoE LM on the standard library's source (2 CPUs)."""
    return RunConfig(
        recipe="lm-moe-tiny",
        model=model_config("lm-moe-tiny"),
        data=DataConfig(corpus="stdlib", seq_len=256, batch_size=32, eval_batches=16),
        optim=OptimConfig(lr=3e-3, warmup_steps=50),
        train=TrainConfig(steps=2000, eval_every=250, checkpoint_every=500),
    )


@recipe("lm-dense-tiny")
def lm_dense_tiny() -> RunConfig:
    """``lm-moe-tiny``'s dense baseline: same data and budget, same activated FLOPs per token."""
    return dense_baseline(lm_moe_tiny())


@recipe("lm-moe-test")
def lm_moe_test() -> RunConfig:
    """Seconds-long run for tests and smoke checks."""
    return RunConfig(
        recipe="lm-moe-test",
        model=model_config("lm-moe-test"),
        data=DataConfig(corpus="stdlib", seq_len=32, batch_size=8, eval_batches=4),
        optim=OptimConfig(lr=3e-3, warmup_steps=5),
        train=TrainConfig(
            steps=30, eval_every=10, checkpoint_every=10, log_every=5, sample_tokens=16
        ),
    )


@recipe("lm-mixtral-tiny")
def lm_mixtral_tiny() -> RunConfig:
    """A small Mixtral-architecture MoE LM (GQA, SwiGLU experts, top-2 in every layer) on the
    default data; its runs export to transformers (``ms.convert.export_mixtral``)."""
    return RunConfig(
        recipe="lm-mixtral-tiny",
        model=model_config("lm-mixtral-tiny"),
        data=DataConfig(corpus="stdlib", seq_len=256, batch_size=32, eval_batches=16),
        optim=OptimConfig(lr=3e-3, warmup_steps=50),
        train=TrainConfig(steps=3000, eval_every=250, checkpoint_every=500),
    )


@recipe("lm-qwen2moe-tiny")
def lm_qwen2moe_tiny() -> RunConfig:
    """``lm-mixtral-tiny``'s run for a small Qwen2-MoE-architecture LM (q/k/v biases, a gated
    shared expert, unnormalised top-2); its runs export to transformers
    (``ms.convert.export_qwen2_moe``)."""
    return dataclasses.replace(
        lm_mixtral_tiny(), recipe="lm-qwen2moe-tiny", model=model_config("lm-qwen2moe-tiny")
    )


@recipe("lm-deepseekmoe-tiny")
def lm_deepseekmoe_tiny() -> RunConfig:
    """A small DeepSeekMoE LM (fine-grained and shared experts, dense first layer) with
    DeepSeek-V3's sigmoid router balanced without an aux loss, on the default data."""
    return RunConfig(
        recipe="lm-deepseekmoe-tiny",
        model=model_config("lm-deepseekmoe-tiny"),
        data=DataConfig(corpus="stdlib", seq_len=256, batch_size=32, eval_batches=16),
        optim=OptimConfig(lr=3e-3, warmup_steps=50),
        train=TrainConfig(steps=3000, eval_every=250, checkpoint_every=500),
    )


def finetune_defaults(task: str) -> RunConfig:
    """``moesaic finetune``'s run before the pretrained run's model section replaces ``model``:
    texts of up to 128 tokens, 32 per step, 1000 steps, AdamW at 1e-3 with little weight decay,
    and Switch's dropout (``FinetuneConfig``'s defaults)."""
    return RunConfig(
        recipe=f"finetune-{task}",
        data=DataConfig(seq_len=128, batch_size=32, eval_batches=64),
        optim=OptimConfig(lr=1e-3, warmup_steps=50, weight_decay=0.01),
        train=TrainConfig(
            steps=1000, eval_every=100, checkpoint_every=250, log_every=10, sample_tokens=0
        ),
        finetune=FinetuneConfig(task=task),
    )


@recipe("lm-taskmoe")
def lm_taskmoe() -> RunConfig:
    """TaskMoE on the multi-domain corpus: the domain labels are the tasks, and every MoE layer
    routes by the task (``lm-taskmoe-tiny``), so each domain's sub-network can be extracted
    (``moesaic extract``). The trainer passes each batch's domains as
    ``ms.routing_context(task=batch.domain)``."""
    return RunConfig(
        recipe="lm-taskmoe",
        model=model_config("lm-taskmoe-tiny"),
        data=DataConfig(corpus="mixture", seq_len=128, batch_size=32, eval_batches=16),
        optim=OptimConfig(lr=3e-3, warmup_steps=50),
        train=TrainConfig(steps=3000, eval_every=250, checkpoint_every=500),
    )


@recipe("lm-tokenmoe")
def lm_tokenmoe() -> RunConfig:
    """``lm-taskmoe``'s token-routed twin: same data, steps, experts and activated FLOPs."""
    return dataclasses.replace(
        lm_taskmoe(), recipe="lm-tokenmoe", model=model_config("lm-tokenmoe-tiny")
    )


@recipe("lm-sweep")
def lm_sweep() -> RunConfig:
    """``moesaic sweep``'s base: a top-1 MoE (16 experts every other layer) on the multi-domain
    corpus with the jargon domain held out as out-of-domain data; the sweep sets the width,
    depth and steps of each point."""
    return RunConfig(
        recipe="lm-sweep",
        model=dataclasses.replace(
            model_config("lm-moe-tiny"),
            max_seq_len=128,
            moe=dataclasses.replace(model_config("lm-moe-tiny").moe, num_experts=16),
        ),
        data=DataConfig(
            corpus="mixture", seq_len=128, batch_size=16, eval_batches=8, holdout_domain="jargon"
        ),
        optim=OptimConfig(lr=3e-3, warmup_steps=50),
        train=TrainConfig(steps=900, eval_every=90, checkpoint_every=225, sample_tokens=0),
    )


@recipe("lm-moe-4l")
def lm_moe_4l() -> RunConfig:
    """A four-layer standard MoE LM (32 top-1 experts every other layer): PR-MoE's baseline."""
    return dataclasses.replace(lm_moe_tiny(), recipe="lm-moe-4l", model=model_config("lm-moe-4l"))


@recipe("lm-prmoe")
def lm_prmoe() -> RunConfig:
    """PR-MoE (DeepSpeed-MoE): ``lm-moe-4l`` with pyramid expert counts [0, 16, 0, 32] and
    Residual-MoE layers; same data and budget."""
    return dataclasses.replace(
        lm_moe_tiny(), recipe="lm-prmoe", model=model_config("lm-prmoe-tiny")
    )


# The image recipes and the LSTM-MoE recipes (Shazeer et al. 2017) live in their own modules;
# importing them registers them here.
from moesaic.train import lstm_recipes, vision_recipes  # noqa: E402, F401
