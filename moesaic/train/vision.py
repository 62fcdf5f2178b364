"""Training on images: the ``ImageTask`` the trainer runs for a config with a ``vision`` section.

One task, two objectives (``vision.objective``): "classify" (cross-entropy on the labels: ViT,
V-MoE, MLP-Mixer, Sparse-MLP on Fashion-MNIST or sklearn's digits) and "contrastive" (SimCLR's
NT-Xent between two augmented views of each image through a projection MLP, Chen et al. 2020,
§2.1; the labels are never read, and ``moesaic vision probe`` measures the representation with a
linear probe). The trainer's loop, checkpoints, exact resume, guard, metrics and routing log are
the ones every task uses; the routing log tallies routing by class (the report's class-by-expert
heat map).

Augmentation (``vision.augment``): a random crop of the image padded by 2 pixels (1 for 8x8
images) and, with "crop+flip", a horizontal flip with probability 1/2. Each global batch draws
its crops from a generator seeded by the run's seed and the batch's index, so a resumed run and
a data-parallel run see exactly the augmentation of an uninterrupted single process.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moesaic.data.images import ImageSplits, image_splits
from moesaic.inference.capacity import capacity_override
from moesaic.models.mixer import MixerConfig, MixerModel
from moesaic.models.vit import VisionTransformer, ViTConfig
from moesaic.train.classify import ExampleSampler
from moesaic.train.config import ConfigError, RunConfig
from moesaic.train.tasks import Task

__all__ = [
    "ImageBatch",
    "ImageSampler",
    "ImageTask",
    "ContrastiveModel",
    "augment",
    "build_vision_model",
    "nt_xent",
    "LoadedVisionRun",
    "load_vision_run",
]


@dataclasses.dataclass
class ImageBatch:
    """Images ``x`` (B, C, H, W) and classes ``y`` (B,); ``x2`` the second view (contrastive)."""

    x: torch.Tensor
    y: torch.Tensor
    x2: torch.Tensor | None = None

    @property
    def domain(self) -> torch.Tensor:
        """The routing log tallies routing by class."""
        return self.y


def augment(images: torch.Tensor, mode: str, gen: torch.Generator) -> torch.Tensor:
    """``images`` (B, C, H, W) randomly cropped after zero padding (2 pixels, 1 below 16x16)
    and, for ``mode="crop+flip"``, flipped left-right with probability 1/2; "none" returns them
    unchanged. Every random number comes from ``gen``."""
    if mode == "none":
        return images
    B, _, H, W = images.shape
    pad = 2 if H >= 16 else 1
    padded = F.pad(images, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (B,), generator=gen).tolist()
    dx = torch.randint(0, 2 * pad + 1, (B,), generator=gen).tolist()
    flip = torch.rand(B, generator=gen) < 0.5
    out = torch.stack([padded[i, :, dy[i] : dy[i] + H, dx[i] : dx[i] + W] for i in range(B)])
    if mode == "crop+flip":
        out = torch.where(flip[:, None, None, None], out.flip(-1), out)
    return out


class ImageSampler(ExampleSampler):
    """``ExampleSampler``'s resumable epochs over images, with each global batch augmented by
    a generator seeded from (seed, batch index) before rank r takes its rows; ``views=2`` gives
    two independent augmentations of every image (contrastive)."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        seed: int,
        mode: str,
        views: int = 1,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.images, self.mode, self.views = images, mode, views
        super().__init__((labels, labels, labels), batch_size, seed, rank, world_size)

    def next_batch(self) -> ImageBatch:
        # rows consumed before this batch: every batch takes batch_size rows in sequence
        index = (self.epoch * len(self.y) + self.position) // self.batch_size
        rows = torch.tensor(self.next_rows())
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + 7_919 * index + 17)
        views = [augment(self.images[rows], self.mode, gen) for _ in range(self.views)]
        per_rank = self.batch_size // self.world_size
        mine = slice(self.rank * per_rank, (self.rank + 1) * per_rank)
        second = views[1][mine] if self.views == 2 else None
        return ImageBatch(views[0][mine], self.y[rows][mine], second)


class ContrastiveModel(nn.Module):
    """A vision model's ``embed`` followed by SimCLR's projection MLP (D -> D -> ``proj_dim``);
    the backbone's head is unused."""

    def __init__(self, backbone: nn.Module, d_model: int, proj_dim: int = 64) -> None:
        super().__init__()
        self.backbone = backbone
        self.proj = nn.Sequential(
            nn.Linear(d_model, d_model), nn.ReLU(), nn.Linear(d_model, proj_dim)
        )
        backbone.head.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(self.backbone.embed(images))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone.embed(images)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> tuple[torch.Tensor, ...]:
    """SimCLR's NT-Xent loss (Chen et al. 2020, eq. 1) over the 2B views, and the share of views
    whose most similar other view is their partner."""
    z = F.normalize(torch.cat([z1, z2]).float(), dim=-1)
    B = z1.shape[0]
    sim = z @ z.t() / temperature
    sim = sim.masked_fill(torch.eye(2 * B, dtype=torch.bool, device=z.device), float("-inf"))
    partner = torch.cat([torch.arange(B, 2 * B), torch.arange(0, B)]).to(z.device)
    return F.cross_entropy(sim, partner), (sim.argmax(-1) == partner).float().mean()


def build_vision_model(cfg: ViTConfig | MixerConfig, data: ImageSplits) -> nn.Module:
    """The model of ``cfg`` with the image size, channels and classes of ``data``."""
    x, _ = data.splits["train"]
    cfg = dataclasses.replace(
        cfg, image_size=x.shape[-1], channels=x.shape[1], num_classes=len(data.classes)
    )
    return VisionTransformer(cfg) if isinstance(cfg, ViTConfig) else MixerModel(cfg)


class ImageTask(Task):
    """Image classification or contrastive pre-training (see the module docstring)."""

    unit = "images"

    def __init__(self, cfg: RunConfig) -> None:
        if cfg.vision is None:
            raise ValueError("ImageTask needs a run config with a vision section")
        self.cfg, self.vision = cfg, cfg.vision

    @property
    def contrastive(self) -> bool:
        return self.vision.objective == "contrastive"

    def prepare(self, run_dir: Path, is_main: bool) -> None:
        v, d = self.vision, self.cfg.data
        data = image_splits(v.dataset, d.val_fraction, d.seed)
        x, y = data.splits["train"]
        if v.train_examples:
            if v.train_examples > len(y):
                raise ConfigError(
                    f"vision.train_examples={v.train_examples} must be <= the {len(y)} images "
                    f"of {v.dataset}'s training split"
                )
            data.splits["train"] = (x[: v.train_examples], y[: v.train_examples])
        self.data = data
        self.splits = {
            k: (torch.from_numpy(a), torch.from_numpy(b)) for k, (a, b) in data.splits.items()
        }
        self.labels = list(data.classes)
        self.units_per_step = d.batch_size

    def build_model(self, expert_group: object | None) -> nn.Module:
        if expert_group is not None:
            raise ConfigError("image runs do not shard experts (parallel.expert must be 1)")
        model = build_vision_model(self.vision.model, self.data)
        if self.contrastive:
            return ContrastiveModel(model, self.vision.model.d_model)
        return model

    def sampler(self, rank: int, world_size: int) -> ImageSampler:
        x, y = self.splits["train"]
        d, v = self.cfg.data, self.vision
        views = 2 if self.contrastive else 1
        mode = v.augment if not self.contrastive or v.augment != "none" else "crop+flip"
        return ImageSampler(x, y, d.batch_size, d.seed, mode, views, rank, world_size)

    def batches(self, split: str, limit: int | None = None) -> list[ImageBatch]:
        """Split ``split`` in order, in batches of ``data.batch_size`` (the first ``limit``);
        contrastive runs get a second, seeded augmentation of every image."""
        x, y = self.splits[split]
        B = self.cfg.data.batch_size
        out = []
        for n, i in enumerate(range(0, len(y), B)):
            if limit is not None and n == limit:
                break
            batch = ImageBatch(x[i : i + B], y[i : i + B])
            if self.contrastive:
                gen = torch.Generator().manual_seed(n)
                batch.x2 = augment(batch.x, "crop+flip", gen)
            out.append(batch)
        return out

    def eval_batches(self) -> list[ImageBatch]:
        return self.batches("val", self.cfg.data.eval_batches)

    def loss(self, model: nn.Module, batch: ImageBatch, step: int) -> tuple[torch.Tensor, dict]:
        if self.contrastive:
            loss, acc = nt_xent(model(batch.x), model(batch.x2), self.vision.temperature)
            return loss, {"nt_xent": loss, "pair_acc": acc}
        logits = model(batch.x)
        ce = F.cross_entropy(logits.float(), batch.y)
        return ce, {"ce": ce, "acc": (logits.argmax(-1) == batch.y).float().mean()}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: list) -> dict[str, Any]:
        """``val_loss`` and ``val_acc`` (classification accuracy, or for contrastive runs the
        share of views that find their partner), at ``vision.eval_capacity_factor`` when set."""
        was_training = model.training
        model.eval()
        loss = correct = count = 0.0
        factor = self.vision.eval_capacity_factor
        with capacity_override(model, factor) if factor is not None else contextlib.nullcontext():
            for b in batches:
                if self.contrastive:
                    nll, acc = nt_xent(model(b.x), model(b.x2), self.vision.temperature)
                    loss += nll.item() * len(b.y)
                    correct += acc.item() * len(b.y)
                else:
                    logits = model(b.x).float()
                    loss += F.cross_entropy(logits, b.y, reduction="sum").item()
                    correct += (logits.argmax(-1) == b.y).sum().item()
                count += len(b.y)
        model.train(was_training)
        return {"val_loss": loss / count, "val_acc": correct / count}


@dataclasses.dataclass
class LoadedVisionRun:
    cfg: RunConfig
    task: ImageTask
    model: nn.Module
    step: int


def load_vision_run(run_dir: Path) -> LoadedVisionRun:
    """An image run's config, data and model with its newest checkpoint that verifies, in eval
    mode."""
    from moesaic.train.checkpoint import load_newest_fitting
    from moesaic.train.config import config_from_dict
    from moesaic.train.run import read_run_config

    run_dir = Path(run_dir)
    cfg = config_from_dict(RunConfig, read_run_config(run_dir))
    if cfg.vision is None:
        raise ConfigError(f"{run_dir} is not an image run (its config has no vision section)")
    task = ImageTask(cfg)
    task.prepare(run_dir, is_main=False)
    with torch.random.fork_rng():
        model = task.build_model(None)
    state = load_newest_fitting(
        model, run_dir / "checkpoints", lambda message: print(f"moesaic: {message}", flush=True)
    )
    if state is None:
        raise FileNotFoundError(f"{run_dir}/checkpoints holds no checkpoint yet")
    model.eval()
    return LoadedVisionRun(cfg, task, model, int(state["step"]))
