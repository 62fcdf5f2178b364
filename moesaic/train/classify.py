"""Fine-tuning a (pretrained) language model on a labelled text task: the ``Classification``
task the trainer runs for a config with a ``finetune`` section (``moesaic finetune``).

The model is a ``SequenceClassifier`` over the run's ``MoELM``, loaded from the pretrained run
``finetune.init``; the text is that run's tokenizer's ids, cut to ``data.seq_len`` and
right-padded. Switch Transformer's fine-tuning recipe (Fedus et al. 2022, §4.2) is the default:
dropout 0.1 outside the experts, 0.4 inside them (``finetune.expert_dropout``). Prompt tuning
(``finetune.method="prompt"``) trains only the soft prompt and the classifier; the language
model's weights stay bit-identical.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moesaic.data import build_tokenizer, tokenizer_from_json
from moesaic.data.labelled import load_labelled
from moesaic.layer import MoE
from moesaic.models.classifier import SequenceClassifier
from moesaic.models.lm import MoELM
from moesaic.train.checkpoint import (
    list_checkpoints,
    load_newest_fitting,
    write_atomic,
)
from moesaic.train.config import ConfigError, RunConfig, config_from_dict
from moesaic.train.data import TOKENIZER_FILE
from moesaic.train.tasks import Task

__all__ = ["Classification", "LabelledBatch", "ExampleSampler", "pretrained_config"]


@dataclasses.dataclass
class LabelledBatch:
    """Token ids ``x`` (B, S), ``mask`` (B, S) True on real tokens, classes ``y`` (B,)."""

    x: torch.Tensor
    mask: torch.Tensor
    y: torch.Tensor

    @property
    def domain(self) -> torch.Tensor:
        """The routing log tallies routing by class."""
        return self.y


def encode_texts(texts: list[str], tokenizer: Any, seq_len: int) -> tuple[torch.Tensor, ...]:
    """(ids (N, seq_len), mask (N, seq_len)): each text's first ``seq_len`` ids, right-padded
    with id 0 (masked out)."""
    ids = torch.zeros(len(texts), seq_len, dtype=torch.long)
    mask = torch.zeros(len(texts), seq_len, dtype=torch.bool)
    for i, text in enumerate(texts):
        row = torch.as_tensor(tokenizer.encode(text)[:seq_len], dtype=torch.long)
        if row.numel() == 0:  # an empty text still gets one position to pool
            row = torch.zeros(1, dtype=torch.long)
        ids[i, : row.numel()] = row
        mask[i, : row.numel()] = True
    return ids, mask


class ExampleSampler:
    """Batches of ``batch_size`` examples in a fresh seeded permutation per epoch; with W ranks
    rank r takes rows r*B/W .. (r+1)*B/W of every global batch. The state (epoch, position) is
    part of every checkpoint, so a resumed run sees the same batches."""

    def __init__(
        self,
        data: tuple[torch.Tensor, ...],
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size % world_size:
            raise ValueError(
                f"data.batch_size={batch_size} must be divisible by the number of processes "
                f"{world_size} (it is the global batch)"
            )
        self.ids, self.mask, self.y = data
        if len(self.y) == 0:
            raise ValueError("the training split holds no examples")
        self.batch_size, self.seed = batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.position = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(len(self.y), generator=gen)

    def next_rows(self) -> list[int]:
        """The next global batch's row indices (all ranks'), advancing the state."""
        rows: list[int] = []
        while len(rows) < self.batch_size:
            if self.position == len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation()
            take = min(self.batch_size - len(rows), len(self._order) - self.position)
            rows += self._order[self.position : self.position + take].tolist()
            self.position += take
        return rows

    def next_batch(self) -> LabelledBatch:
        rows = self.next_rows()
        per_rank = self.batch_size // self.world_size
        idx = torch.tensor(rows[self.rank * per_rank : (self.rank + 1) * per_rank])
        return LabelledBatch(self.ids[idx], self.mask[idx], self.y[idx])

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if int(state["seed"]) != self.seed:
            raise ValueError(f"sampler state has seed {state['seed']}, this run {self.seed}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation()


def pretrained_config(init: str | Path) -> dict:
    """The run config (as a dict) of the pretrained run ``init``: its ``model`` section is what
    a fine-tuning run builds."""
    from moesaic.train.run import read_run_config

    try:
        data = read_run_config(Path(init))
    except FileNotFoundError as err:
        raise ConfigError(f"finetune.init={str(init)!r}: {err}") from None
    if data.get("finetune"):
        raise ConfigError(
            f"finetune.init={str(init)!r} is itself a fine-tuning run: start from the "
            f"pretrained language model's run"
        )
    return data


class Classification(Task):
    """Fine-tuning on ``cfg.finetune.task`` (see the module docstring)."""

    unit = "examples"

    def __init__(self, cfg: RunConfig) -> None:
        if cfg.finetune is None:
            raise ValueError("Classification needs a run config with a finetune section")
        self.cfg, self.ft = cfg, cfg.finetune

    def prepare(self, run_dir: Path, is_main: bool) -> None:
        cfg, ft = self.cfg, self.ft
        data = load_labelled(ft.task, num_classes=ft.num_classes, per_class=ft.per_class)
        self.classes = data.classes
        saved = run_dir / TOKENIZER_FILE
        # a run that has checkpoints loads its own weights and tokenizer: the pretrained run
        # is read only when a fine-tuning run starts
        self.started = bool(list_checkpoints(run_dir / "checkpoints"))
        if self.started and saved.exists():
            self.tokenizer = tokenizer_from_json(saved.read_text())
        elif ft.init:
            self._check_init()
            source = Path(ft.init) / TOKENIZER_FILE
            if is_main:
                shutil.copyfile(source, saved)
            self.tokenizer = tokenizer_from_json(source.read_text())
        else:
            texts = (t for t, _ in data.splits["train"])
            self.tokenizer = (
                build_tokenizer("byte")
                if cfg.data.tokenizer == "byte"
                else build_tokenizer("bpe", texts, cfg.data.bpe_vocab_size)
            )
            if is_main:
                write_atomic(saved, self.tokenizer.to_json())
        S = cfg.data.seq_len
        self.splits = {}
        for name, pairs in data.splits.items():
            ids, mask = encode_texts([t for t, _ in pairs], self.tokenizer, S)
            self.splits[name] = (ids, mask, torch.tensor([y for _, y in pairs], dtype=torch.long))
        self.labels = list(self.classes)
        self.units_per_step = cfg.data.batch_size

    def _check_init(self) -> None:
        saved = config_from_dict(type(self.cfg.model), pretrained_config(self.ft.init)["model"])
        mine = dataclasses.replace(self.cfg.model, dropout=saved.dropout)
        if saved.moe is not None and mine.moe is not None:
            moe = dataclasses.replace(mine.moe, expert_dropout=saved.moe.expert_dropout)
            mine = dataclasses.replace(mine, moe=moe)
        if mine != saved:
            raise ConfigError(
                f"finetune.init={self.ft.init!r}: this run's model section differs from the "
                f"pretrained run's (only dropout may change): take it from that run's config"
            )

    def build_model(self, expert_group: object | None) -> nn.Module:
        cfg, ft = self.cfg, self.ft
        lm_cfg = dataclasses.replace(
            cfg.model, vocab_size=self.tokenizer.vocab_size, dropout=ft.dropout
        )
        if lm_cfg.moe is not None:
            moe = dataclasses.replace(lm_cfg.moe, expert_dropout=ft.expert_dropout)
            lm_cfg = dataclasses.replace(lm_cfg, moe=moe)
        lm = MoELM(lm_cfg)  # whole, loaded, then sharded: every rank gets its pretrained experts
        if ft.init and not self.started:
            self._load_pretrained(lm)
        if expert_group is not None:
            lm.shard_experts(expert_group)
        prompt = ft.prompt_tokens if ft.method == "prompt" else 0
        model = SequenceClassifier(lm, len(self.classes), ft.pool, prompt)
        if ft.method == "prompt":
            lm.requires_grad_(False)
        if ft.freeze_router:
            for module in lm.modules():
                if isinstance(module, MoE):
                    module.router.requires_grad_(False)
        return model

    def _load_pretrained(self, lm: MoELM) -> None:
        checkpoints = Path(self.ft.init) / "checkpoints"
        say = lambda message: print(f"moesaic: {message}", flush=True)  # noqa: E731
        if load_newest_fitting(lm, checkpoints, say) is None:
            raise ConfigError(f"finetune.init={self.ft.init!r} holds no checkpoint yet")

    def sampler(self, rank: int, world_size: int) -> ExampleSampler:
        d = self.cfg.data
        return ExampleSampler(self.splits["train"], d.batch_size, d.seed, rank, world_size)

    def batches(self, split: str, limit: int | None = None) -> list[LabelledBatch]:
        """Split ``split`` in order, in batches of ``data.batch_size`` (the first ``limit``)."""
        ids, mask, y = self.splits[split]
        B = self.cfg.data.batch_size
        out = [
            LabelledBatch(ids[i : i + B], mask[i : i + B], y[i : i + B])
            for i in range(0, len(y), B)
        ]
        return out[:limit]

    def eval_batches(self) -> list[LabelledBatch]:
        return self.batches("val", self.cfg.data.eval_batches)

    def loss(self, model: nn.Module, batch: LabelledBatch, step: int) -> tuple[torch.Tensor, dict]:
        logits = model(batch.x, batch.mask)
        ce = F.cross_entropy(logits.float(), batch.y)
        acc = (logits.argmax(-1) == batch.y).float().mean()
        return ce, {"ce": ce, "acc": acc}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: list) -> dict[str, float]:
        was_training = model.training
        model.eval()
        loss = correct = count = 0.0
        for b in batches:
            logits = model(b.x, b.mask).float()
            loss += F.cross_entropy(logits, b.y, reduction="sum").item()
            correct += (logits.argmax(-1) == b.y).sum().item()
            count += len(b.y)
        model.train(was_training)
        return {"val_loss": loss / count, "val_acc": correct / count}
