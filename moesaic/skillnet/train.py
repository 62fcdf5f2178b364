"""Joint training and evaluation of SkillNet on its tasks.

Every step draws one batch per task (a task-mixed step), sums the task losses and takes one
AdamW step. Classification tasks use cross-entropy; retrieval tasks the symmetric in-batch
contrastive (InfoNCE / CLIP) loss over batches whose captions are pairwise different.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable

import numpy as np
import torch
from torch.nn import functional as F

from moesaic.metrics.retrieval import accuracy, retrieval_metrics
from moesaic.skillnet.model import SkillNet
from moesaic.skillnet.tasks import TaskData, distinct_label_batch

__all__ = [
    "SkillNetRecipe", "task_loss", "contrastive_loss", "train_skillnet", "optimize", "evaluate",
    "chance",
]  # fmt: skip


@dataclasses.dataclass(kw_only=True)
class SkillNetRecipe:
    """Optimisation settings of ``train_skillnet``."""

    steps: int = 300
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup: int = 20
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"recipe.{name}={v!r} must be an int >= 1")
        if not self.lr > 0:
            raise ValueError(f"recipe.lr={self.lr!r} must be > 0")


def task_loss(model: SkillNet, task: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy (classification) or symmetric InfoNCE (retrieval) of one task's batch."""
    if model.cfg.task_kind(task) == "classify":
        return F.cross_entropy(model.classify(task, batch["inputs"]), batch["labels"])
    q_BP, k_BP = model.embed_pair(task, batch["query"], batch["item"])
    return contrastive_loss(q_BP, k_BP, model.heads[task].scale())


def contrastive_loss(q_BP: torch.Tensor, k_BP: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric in-batch InfoNCE of unit-norm pairs: row i of ``q`` matches row i of ``k``."""
    logits_BB = scale * q_BP @ k_BP.t()
    target = torch.arange(q_BP.shape[0], device=q_BP.device)
    return (F.cross_entropy(logits_BB, target) + F.cross_entropy(logits_BB.t(), target)) / 2


def _batch(data: TaskData, size: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
    split = data.splits["train"]
    if data.kind == "retrieve":
        idx = distinct_label_batch(split["labels"], size, rng)
    else:
        idx = rng.integers(0, data.size("train"), size=size)
    idx_t = torch.from_numpy(np.asarray(idx))
    return {k: v[idx_t] for k, v in split.items()}


def train_skillnet(
    model: SkillNet,
    data: dict[str, TaskData],
    recipe: SkillNetRecipe,
    log: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Train ``model`` on every task of ``data`` jointly; returns one record per step
    (``step``, ``loss`` per task, ``lr``, ``seconds``)."""
    torch.manual_seed(recipe.seed)
    rng = np.random.default_rng(recipe.seed)

    def losses() -> dict[str, torch.Tensor]:
        return {t: task_loss(model, t, _batch(d, recipe.batch_size, rng)) for t, d in data.items()}

    return optimize(model, list(model.parameters()), losses, recipe, log)


def optimize(
    model: torch.nn.Module,
    params: list[torch.nn.Parameter],
    losses: Callable[[], dict[str, torch.Tensor]],
    recipe: SkillNetRecipe,
    log: Callable[[dict], None] | None = None,
) -> list[dict]:
    """``recipe.steps`` AdamW steps on the sum of ``losses()`` (one fresh batch per term per
    call), warmup then cosine; returns one record per step (``step``, ``loss/<term>``, ``lr``,
    ``seconds``)."""
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    history, start = [], time.perf_counter()
    model.train()
    for step in range(recipe.steps):
        lr = recipe.lr * _schedule(step, recipe)
        for group in opt.param_groups:
            group["lr"] = lr
        terms = losses()
        opt.zero_grad(set_to_none=True)
        torch.stack(list(terms.values())).sum().backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        record = {"step": step + 1, "lr": lr, "seconds": time.perf_counter() - start}
        record.update({f"loss/{t}": float(v.detach()) for t, v in terms.items()})
        history.append(record)
        if log is not None:
            log(record)
    return history


def _schedule(step: int, recipe: SkillNetRecipe) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < recipe.warmup:
        return (step + 1) / recipe.warmup
    progress = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def _chunks(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, size: int = 256):
    return torch.cat([fn(x[i : i + size]) for i in range(0, x.shape[0], size)])


def queries_and_gallery(split: dict[str, torch.Tensor]):
    """One query per distinct label (its first caption) and every item as the gallery."""
    labels = split["labels"]
    _, first = np.unique(labels.numpy(), return_index=True)
    first_t = torch.from_numpy(first)
    return split["query"][first_t], labels[first_t], split["item"], labels


@torch.no_grad()
def evaluate(model: SkillNet, data: dict[str, TaskData], split: str = "test") -> dict[str, dict]:
    """Per task: ``accuracy`` (classification) or ``R@1``, ``R@5``, ``MRR`` (retrieval)."""
    was_training = model.training
    model.eval()
    out = {}
    for task, d in data.items():
        s = d.splits[split]
        if d.kind == "classify":
            logits = _chunks(lambda x, t=task: model.classify(t, x), s["inputs"])
            out[task] = {"accuracy": accuracy(logits, s["labels"])}
        else:
            query, q_labels, gallery, g_labels = queries_and_gallery(s)
            q = _chunks(lambda x, t=task: model.embed_pair(t, x, None)[0], query)
            k = _chunks(lambda x, t=task: model.embed_pair(t, None, x)[1], gallery)
            out[task] = retrieval_metrics(q @ k.t(), q_labels, g_labels)
    model.train(was_training)
    return out


def chance(data: dict[str, TaskData], split: str = "test") -> dict[str, dict]:
    """What a random scorer expects: majority-class accuracy; for retrieval R@1 = mean share
    of correct items in the gallery per query, R@5 and MRR of a random ranking (exact for
    one correct item, an upper estimate for R@5 otherwise)."""
    out = {}
    for task, d in data.items():
        s = d.splits[split]
        labels = s["labels"]
        if d.kind == "classify":
            out[task] = {"accuracy": float(torch.bincount(labels).max()) / labels.numel()}
            continue
        _, q_labels, _, g_labels = queries_and_gallery(s)
        G = g_labels.numel()
        share = (q_labels[:, None] == g_labels[None, :]).float().sum(1) / G
        out[task] = {
            "R@1": float(share.mean()),
            "R@5": float((5 * share).clamp(max=1).mean()),
            "MRR": float((share * (1 + torch.log(1 / share))).clamp(max=1).mean()),
        }
    return out
