"""What the one training loop needs from a kind of training: the ``Task`` interface.

``Trainer`` (moesaic/train/trainer.py) owns everything that does not depend on what is learnt:
the optimizer and schedule, aux losses, gradient sync and clipping, the guard, checkpoints and
exact resume, signals, metrics and the progress bar. A ``Task`` owns the rest: its data (and a
sampler whose state is part of every checkpoint), its model, its loss and its evaluation.
``LanguageModelling`` is next-token prediction, optionally distilled from a teacher run;
``Classification`` (moesaic/train/classify.py) fine-tunes a pretrained language model on a
labelled task; ``ImageTask`` (moesaic/train/vision.py) trains vision models. ``task_for(cfg)``
picks the one a run config describes.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moesaic.context import routing_context
from moesaic.layer import MoE
from moesaic.models.lm import MoELM
from moesaic.models.lstm import LSTMMoE
from moesaic.train.checkpoint import write_atomic
from moesaic.train.config import ConfigError, RunConfig
from moesaic.train.data import TOKENIZER_FILE, PreparedData, prepare_data
from moesaic.train.distill import distill_loss, kd_weight

__all__ = [
    "Task",
    "LanguageModelling",
    "task_for",
    "build_model",
    "evaluate",
    "load_teacher",
    "domains_as_tasks",
]


class Task(abc.ABC):
    """One kind of training, as the trainer sees it.

    Attributes (set by ``prepare``):
        labels: names of the labels whose routing the routing log tallies (domains, classes).
        units_per_step: what one step consumes, in ``unit`` s (tokens, examples).
    """

    unit: str = "tokens"
    labels: list[str]
    units_per_step: int

    @abc.abstractmethod
    def prepare(self, run_dir: Path, is_main: bool) -> None:
        """Load the data (and anything else the task reads) before the model is built; write
        the task's own run files (rank 0 only)."""

    @abc.abstractmethod
    def build_model(self, expert_group: object | None) -> nn.Module:
        """The model, initialised from the seeded global RNG (experts sharded over
        ``expert_group`` when given)."""

    @abc.abstractmethod
    def sampler(self, rank: int, world_size: int) -> Any:
        """Training batches: ``next_batch()``, ``state_dict()``, ``load_state_dict()``; the
        batch has ``x`` (B, S) and ``domain`` (B,) label ids for the routing log."""

    @abc.abstractmethod
    def eval_batches(self) -> list:
        """Fixed validation batches."""

    @abc.abstractmethod
    def loss(self, model: nn.Module, batch: Any, step: int) -> tuple[torch.Tensor, dict]:
        """(the objective without aux losses, named scalars to log) for 1-based ``step``."""

    @abc.abstractmethod
    def evaluate(self, model: nn.Module, batches: list) -> dict[str, float]:
        """Validation metrics; ``val_loss`` is always one of them."""


def build_model(
    cfg: RunConfig, vocab_size: int, expert_group: object | None = None
) -> MoELM | LSTMMoE:
    """The run's language model with the tokenizer's vocabulary size (experts sharded over
    ``expert_group`` when given): ``LSTMMoE`` for a run with an ``lstm`` section, else
    ``MoELM``."""
    if cfg.lstm is not None:
        assert expert_group is None, "RunConfig refuses parallel.expert > 1 for LSTM runs"
        return LSTMMoE(dataclasses.replace(cfg.lstm, vocab_size=vocab_size))
    return MoELM(dataclasses.replace(cfg.model, vocab_size=vocab_size), expert_group)


def task_routed(model: nn.Module) -> bool:
    """Whether an MoE layer of ``model`` routes by task (TaskMoE, SkillNet's skills)."""
    return any(isinstance(m, MoE) and m.router.reads_task_ids for m in model.modules())


def domains_as_tasks(routed: bool, batch: Any):
    """The context a forward on ``batch`` runs in: each row's domain as its task id when the
    model routes by task (``routed = task_routed(model)``; TaskMoE, Kudugunta et al. 2021: the
    domain is the task)."""
    if routed:
        return routing_context(task=batch.domain)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model: nn.Module, batches: list) -> float:
    """Mean next-token cross-entropy (nats per token) over fixed validation batches."""
    was_training = model.training
    model.eval()
    total, routed = 0.0, task_routed(model)
    for b in batches:
        with domains_as_tasks(routed, b):
            total += model.loss(b.x, b.y).item()
    model.train(was_training)
    return total / len(batches)


def load_teacher(run_dir: str | Path, vocab_size: int) -> MoELM:
    """A finished run's language model, frozen, in eval mode, to teach another with the same
    vocabulary."""
    from moesaic.train.run import load_run  # run.py reads configs that name this module's tasks

    try:
        teacher = load_run(Path(run_dir))
    except FileNotFoundError as err:
        raise ConfigError(f"distill.teacher={str(run_dir)!r}: {err}") from None
    if teacher.tokenizer.vocab_size != vocab_size:
        raise ConfigError(
            f"distill.teacher={str(run_dir)!r} has a vocabulary of "
            f"{teacher.tokenizer.vocab_size} tokens but this run's has {vocab_size}: a teacher "
            f"must share the student's tokenizer"
        )
    model = teacher.model.eval()
    model.requires_grad_(False)
    return model


class LanguageModelling(Task):
    """Next-token prediction on ``cfg.data``'s corpus (by ``MoELM``, or ``LSTMMoE`` for a run
    with an ``lstm`` section); with ``cfg.distill`` the loss also matches a teacher run's
    softened predictions (moesaic/train/distill.py).

    ``data`` may be passed already prepared (``moesaic compare`` shares it between two runs).
    """

    unit = "tokens"

    def __init__(self, cfg: RunConfig, data: PreparedData | None = None) -> None:
        self.cfg, self.data, self.teacher = cfg, data, None
        self._task_routed: dict[nn.Module, bool] = {}

    def prepare(self, run_dir: Path, is_main: bool) -> None:
        cfg = self.cfg
        if self.data is None:
            self.data = prepare_data(cfg.data, run_dir)
        tokenizer_file = run_dir / TOKENIZER_FILE
        if is_main and not tokenizer_file.exists():
            write_atomic(tokenizer_file, self.data.tokenizer.to_json())
        if cfg.distill is not None:
            self.teacher = load_teacher(cfg.distill.teacher, self.data.tokenizer.vocab_size)
        self.labels = list(self.data.train.domains)
        self.units_per_step = cfg.data.batch_size * cfg.data.seq_len
        section, lm = ("model", cfg.model) if cfg.lstm is None else ("lstm", cfg.lstm)
        num_tasks = (lm.moe.router_options or {}).get("num_tasks") if lm.moe else None
        if num_tasks is not None and num_tasks < len(self.labels):
            raise ConfigError(
                f"{section}.moe.router_options.num_tasks={num_tasks} must be >= the corpus's "
                f"{len(self.labels)} domains {self.labels} (each domain is a task)"
            )

    @property
    def tokenizer(self):
        return self.data.tokenizer

    def build_model(self, expert_group: object | None) -> nn.Module:
        d = self.cfg.distill
        if d is None or not d.init_from_teacher:
            return build_model(self.cfg, self.data.tokenizer.vocab_size, expert_group)
        model = build_model(self.cfg, self.data.tokenizer.vocab_size)  # whole, then sharded
        own, given = model.state_dict(), self.teacher.state_dict()
        shared = {k: v for k, v in given.items() if k in own and own[k].shape == v.shape}
        model.load_state_dict(shared, strict=False)
        self.inherited = sorted(shared)
        if expert_group is not None:
            model.shard_experts(expert_group)
        return model

    def sampler(self, rank: int, world_size: int):
        return self.data.sampler(self.cfg.data, rank, world_size)

    def eval_batches(self) -> list:
        return self.data.eval_batches(self.cfg.data)

    def loss(self, model: nn.Module, batch: Any, step: int) -> tuple[torch.Tensor, dict]:
        d = self.cfg.distill
        w = 0.0 if d is None else kd_weight(step, d.weight, d.until, d.schedule)
        if w == 0.0:
            with domains_as_tasks(self._routed(model), batch):
                ce = model.loss(batch.x, batch.y)
            return ce, {"ce": ce}
        with domains_as_tasks(self._routed(model), batch):
            logits = model(batch.x)
        ce = F.cross_entropy(logits.flatten(0, 1).float(), batch.y.flatten())
        with torch.no_grad(), domains_as_tasks(self._routed(self.teacher), batch):
            teacher_logits = self.teacher(batch.x)
        kd = distill_loss(logits, teacher_logits, d.temperature)
        return (1 - w) * ce + w * kd, {"ce": ce, "kd": kd, "kd_weight": torch.tensor(w)}

    def evaluate(self, model: nn.Module, batches: list) -> dict[str, float]:
        return {"val_loss": evaluate(model, batches)}

    def _routed(self, model: nn.Module) -> bool:
        """``task_routed(model)``, looked up once per model rather than at every step."""
        if model not in self._task_routed:
            self._task_routed[model] = task_routed(model)
        return self._task_routed[model]


def task_for(cfg: RunConfig, data: PreparedData | None = None) -> Task:
    """The task ``cfg`` describes: ``ImageTask`` with a ``vision`` section,
    ``Classification`` with a ``finetune`` section, else ``LanguageModelling``;
    ``RetGenTask`` (moesaic/train/retgen.py) with a ``retgen`` section."""
    if cfg.retgen is not None:
        from moesaic.train.retgen import RetGenTask

        return RetGenTask(cfg)
    if cfg.vision is not None:
        from moesaic.train.vision import ImageTask

        return ImageTask(cfg)
    if cfg.finetune is not None:
        from moesaic.train.classify import Classification

        return Classification(cfg)
    return LanguageModelling(cfg, data)
