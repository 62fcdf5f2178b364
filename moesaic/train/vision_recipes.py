"""Recipes of image runs (``moesaic train --recipe vmoe-fashion``), registered in ``RECIPES``.

Each trains on 2 CPU cores in under 15 minutes: Fashion-MNIST (Debian's dataset-fashion-mnist),
batches of 128 images with random crops and flips, AdamW with warm-up and cosine decay. Every
MoE recipe has a dense twin of equal activated FLOPs per patch on the same data and steps.
"""

from __future__ import annotations

import dataclasses

from moesaic.models.registry import model_config
from moesaic.train.config import DataConfig, OptimConfig, RunConfig, TrainConfig, VisionConfig
from moesaic.train.recipes import recipe

__all__ = ["vision_run", "dense_vision_baseline"]


def vision_run(
    name: str, model: str, dataset: str = "fashion-mnist", steps: int = 2500
) -> RunConfig:
    """An image-classification run of the registered model ``model`` on ``dataset``."""
    field = "vit" if model.startswith(("vmoe", "vit")) else "mixer"
    return RunConfig(
        recipe=name,
        data=DataConfig(batch_size=128, eval_batches=24, val_fraction=0.05),
        optim=OptimConfig(lr=2e-3, warmup_steps=100, weight_decay=0.05),
        train=TrainConfig(
            steps=steps, eval_every=250, checkpoint_every=500, log_every=10, sample_tokens=0
        ),
        vision=VisionConfig(dataset=dataset, **{field: model_config(model)}),
    )


def dense_vision_baseline(cfg: RunConfig, name: str) -> RunConfig:
    """``cfg`` with its vision model replaced by the dense model of equal activated FLOPs."""
    v = cfg.vision
    field = "vit" if v.vit is not None else "mixer"
    vision = dataclasses.replace(v, **{field: v.model.dense_equivalent()})
    return dataclasses.replace(cfg, recipe=name, vision=vision)


@recipe("vmoe-fashion")
def vmoe_fashion() -> RunConfig:
    """V-MoE (``vmoe-tiny``: 8 experts, top-2, BPR, capacity 1.05) on Fashion-MNIST."""
    return vision_run("vmoe-fashion", "vmoe-tiny")


@recipe("vit-fashion")
def vit_fashion() -> RunConfig:
    """``vmoe-fashion``'s dense ViT of equal activated FLOPs on the same data and steps."""
    return dense_vision_baseline(vmoe_fashion(), "vit-fashion")


@recipe("sparse-mlp-fashion")
def sparse_mlp_fashion() -> RunConfig:
    """Sparse-MLP (``sparse-mlp-tiny``: token- and channel-mixing MoEs in the last two blocks)
    on Fashion-MNIST."""
    return vision_run("sparse-mlp-fashion", "sparse-mlp-tiny")


@recipe("mixer-fashion")
def mixer_fashion() -> RunConfig:
    """``sparse-mlp-fashion``'s dense MLP-Mixer of equal activated FLOPs per image
    (``mixer-tiny``: the re-represent layers' FLOPs go into wider token MLPs)."""
    return vision_run("mixer-fashion", "mixer-tiny")


@recipe("vmoe-digits")
def vmoe_digits() -> RunConfig:
    """Under a minute on 2 cores: a 2-block V-MoE on sklearn's 8x8 digits (2x2 patches, no
    augmentation: a one-pixel shift is an eighth of the image); extra ``vision``."""
    cfg = vision_run("vmoe-digits", "vmoe-tiny", dataset="digits", steps=600)
    vit = dataclasses.replace(cfg.vision.vit, patch_size=2, n_layers=2, d_model=32, d_ff=64)
    vision = dataclasses.replace(cfg.vision, vit=vit, augment="none")
    data = dataclasses.replace(cfg.data, batch_size=64, eval_batches=4, val_fraction=0.1)
    train = dataclasses.replace(cfg.train, eval_every=100, checkpoint_every=100)
    optim = dataclasses.replace(cfg.optim, lr=3e-3, warmup_steps=30)
    return dataclasses.replace(cfg, vision=vision, data=data, train=train, optim=optim)
