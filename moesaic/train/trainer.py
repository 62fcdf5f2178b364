"""The training loop: AdamW, warm-up + cosine, clipping, aux losses, evals, checkpoints, resume.

``Trainer(cfg, run_dir).fit()`` trains ``cfg`` and writes everything to ``run_dir``
(moesaic/train/checkpoint.py shows the layout). ``resume=True`` continues from the newest
checkpoint and, on the same machine and thread count, produces bit-identical losses and weights
to a run that was never interrupted: weights, optimizer, scheduler, RNG and the data cursor are
all part of the checkpoint. Resuming takes the newest checkpoint that verifies (falling back past
damaged ones, and saying so). The guard (moesaic/train/guard.py) skips or stops on non-finite
steps and logs loss spikes and router collapse as metrics events.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from moesaic.layer import MoE, aux_loss
from moesaic.metrics.params import ParameterCount, count_parameters
from moesaic.metrics.routing_log import RoutingLog
from moesaic.models.lm import MoELM
from moesaic.parallel import (
    ParallelGroups,
    clip_grad_norm,
    full_optimizer_state,
    full_state_dict,
    load_sharded,
    shard_optimizer_state,
    single_process,
    sync_gradients,
)
from moesaic.train.checkpoint import (
    check_fits,
    resumable_checkpoint,
    save_checkpoint,
    write_atomic,
)
from moesaic.train.config import RunConfig, config_to_dict
from moesaic.train.data import TOKENIZER_FILE, PreparedData, prepare_data
from moesaic.train.guard import CollapseWatch, TrainingGuard, TrainingHalted

__all__ = ["Trainer", "TrainResult", "build_model", "evaluate", "lr_factor"]


@dataclasses.dataclass
class TrainResult:
    run_dir: Path
    steps: int
    val_loss: float
    tokens_per_s: float
    params: ParameterCount
    wall_s: float
    evals: list[dict[str, Any]]


def build_model(cfg: RunConfig, vocab_size: int, expert_group: object | None = None) -> MoELM:
    """The run's model with the tokenizer's vocabulary size (experts sharded over
    ``expert_group`` when given)."""
    return MoELM(dataclasses.replace(cfg.model, vocab_size=vocab_size), expert_group)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from 1 to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(model: nn.Module, batches: list) -> float:
    """Mean next-token cross-entropy (nats per token) over fixed validation batches."""
    was_training = model.training
    model.eval()
    total = sum(model.loss(b.x, b.y).item() for b in batches)
    model.train(was_training)
    return total / len(batches)


class Trainer:
    """Train one ``RunConfig`` into ``run_dir``.

    Args:
        cfg: the run's configuration.
        run_dir: where config, metrics, checkpoints and the tokenizer go.
        resume: continue from ``run_dir``'s newest checkpoint.
        progress: show a tqdm bar (loss, tokens/s, dropped-token %).
        data: already prepared data (``moesaic compare`` shares it between its two runs).
        groups: ``ms.parallel.init(...)``'s groups when launched by torchrun: experts are
            sharded over the expert group, each rank trains on its rows of the global batch,
            gradients are averaged, and only rank 0 writes files.
    """

    def __init__(
        self,
        cfg: RunConfig,
        run_dir: Path,
        *,
        resume: bool = False,
        progress: bool = True,
        data: PreparedData | None = None,
        groups: ParallelGroups | None = None,
    ) -> None:
        self.groups = groups = groups or single_process()
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.progress = progress and groups.is_main
        if groups.expert_size != cfg.parallel.expert:
            raise ValueError(
                f"parallel.expert={cfg.parallel.expert} but the process groups were built with "
                f"expert size {groups.expert_size}"
            )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        torch.manual_seed(cfg.train.seed)
        random.seed(cfg.train.seed)
        np.random.seed(cfg.train.seed)
        self.data = data or prepare_data(cfg.data, self.run_dir)
        tokenizer_file = self.run_dir / TOKENIZER_FILE
        if groups.is_main and not tokenizer_file.exists():
            write_atomic(tokenizer_file, self.data.tokenizer.to_json())
        self.model = build_model(cfg, self.data.tokenizer.vocab_size, groups.expert_group)
        self.optimizer = _adamw(self.model, cfg)
        self.guard = TrainingGuard(cfg.guard)
        self.collapse = CollapseWatch(cfg.guard, self.model)
        o, t = cfg.optim, cfg.train
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, o.warmup_steps, t.steps, o.min_lr_ratio)
        )
        self.sampler = self.data.sampler(cfg.data, groups.rank, groups.world_size)
        self.val_batches = self.data.eval_batches(cfg.data)
        self.step = 0
        self.train_s = 0.0  # cumulative seconds spent in training steps (not evals, not saves)
        self.evals: list[dict[str, Any]] = []
        self.metrics_path = self.run_dir / "metrics.jsonl"
        if resume:
            self._resume()
        elif groups.is_main:
            self.metrics_path.write_text("")
        if groups.is_main:
            (self.run_dir / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=1))
        self._tensorboard = _tensorboard_writer(self.run_dir) if groups.is_main else None
        self.routing_log = RoutingLog(
            self.run_dir, self.data.train.domains, t.log_every, t.steps, self.step, groups.is_main
        )

    def fit(self, max_steps: int | None = None) -> TrainResult:
        """Train to ``train.steps`` (or stop, checkpointed, after ``max_steps`` more steps)."""
        cfg, model = self.cfg, self.model
        stop_at = (
            cfg.train.steps if max_steps is None else min(cfg.train.steps, self.step + max_steps)
        )
        tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
        # In a log file (no terminal) a bar line every 30 s instead of one per step.
        bar = tqdm(
            total=cfg.train.steps,
            initial=self.step,
            disable=not self.progress,
            unit="step",
            dynamic_ncols=True,
            mininterval=0.5 if sys.stderr.isatty() else 30,
        )
        start, session_s, trained_steps = time.perf_counter(), 0.0, 0
        model.train()
        try:
            while self.step < stop_at:
                t0 = time.perf_counter()
                row = self._train_step()
                elapsed = time.perf_counter() - t0
                session_s += elapsed
                self.train_s += elapsed
                trained_steps += 1
                self.step += 1
                row["tokens_per_s"] = trained_steps * tokens_per_step / session_s
                events = row.pop("events")
                if (
                    self.step % cfg.train.log_every == 0
                    or self.step == cfg.train.steps
                    or row.get("skipped")
                ):
                    self._log(row)
                for event in events:
                    self._log(event)
                    self._say(_describe(event))
                bar.update(1)
                bar.set_postfix(
                    loss=f"{row['loss']:.3f}",
                    tok_s=f"{row['tokens_per_s']:.0f}",
                    drop=f"{100 * row['dropped']:.1f}%",
                )
                if self.step % cfg.train.eval_every == 0 or self.step == cfg.train.steps:
                    self._eval()
                if self.step % cfg.train.checkpoint_every == 0 or self.step in (
                    cfg.train.steps,
                    stop_at,
                ):
                    self.save()
        except KeyboardInterrupt:
            bar.close()
            if not self.groups.distributed:  # a collective save could wait on a dead peer
                self.save()
            raise
        except TrainingHalted as err:  # the report goes into the metrics too
            self._log({"step": self.step + 1, "event": "halted", "reason": str(err)})
            raise
        finally:
            bar.close()
            self.routing_log.flush()
            if self._tensorboard is not None:
                self._tensorboard.close()
        tok_s = trained_steps * tokens_per_step / session_s if session_s else 0.0
        return TrainResult(
            run_dir=self.run_dir,
            steps=self.step,
            val_loss=self.evals[-1]["val_loss"] if self.evals else float("nan"),
            tokens_per_s=tok_s,
            params=count_parameters(model),
            wall_s=time.perf_counter() - start,
            evals=self.evals,
        )

    def _train_step(self) -> dict[str, Any]:
        batch = self.sampler.next_batch()
        ce = self.model.loss(batch.x, batch.y)
        self.routing_log.record(self.step + 1, self.model, batch)
        aux = aux_loss(self.model)
        loss = ce + aux
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        sync_gradients(self.model, self.groups)
        # The global norm (every rank gets the same), clipping only when grad_clip > 0.
        grad_norm = clip_grad_norm(self.model, self.cfg.optim.grad_clip or math.inf, self.groups)
        loss_v, ce_v, aux_v = _mean_over_ranks([loss, ce, aux], self.groups)
        step = self.step + 1
        skip = self.guard.skip_step(step, {"loss": loss_v, "ce": ce_v, "aux": aux_v}, grad_norm)
        if skip:  # no update at all: weights and optimizer moments stay as they were
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.optimizer.step()
            self.collapse.record()
        self.scheduler.step()  # the schedule follows the step count, skipped or not
        row = {
            "step": step,
            "loss": loss_v,
            "ce": ce_v,
            "aux": aux_v,
            "grad_norm": grad_norm,
            "lr": self.scheduler.get_last_lr()[0],
            "dropped": _dropped_fraction(self.model),
        }
        if skip:
            row.update(skipped=True, skipped_steps=self.guard.skipped)
            self._say(
                f"step {step}: non-finite loss or gradients, step skipped "
                f"({self.guard.skipped} so far)"
            )
        spike = None if skip else self.guard.spike(step, loss_v)
        row["events"] = [spike] if spike else []
        return row

    def _eval(self) -> None:
        row = {
            "step": self.step,
            "val_loss": evaluate(self.model, self.val_batches),
            "train_s": self.train_s,
        }
        self.evals.append(row)
        self._log(row)
        for event in self.collapse.at_eval(self.step, self.groups.distributed):
            self._log(event)
            self._say(_describe(event))

    def _say(self, message: str) -> None:
        """One line on stderr (rank 0 only): fallbacks, skipped steps, spikes, collapse."""
        if self.groups.is_main:
            print(f"moesaic: {message}", file=sys.stderr, flush=True)

    def _log(self, row: dict[str, Any]) -> None:
        if not self.groups.is_main:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tensorboard is not None:
            for key, value in row.items():
                if key != "step":
                    self._tensorboard.add_scalar(key, value, row["step"])

    def save(self) -> Path | None:
        """Checkpoint (collective under expert parallelism; rank 0 writes). The files have the
        single-process layout whatever the expert-parallel size."""
        weights = full_state_dict(self.model, self.groups)
        optimizer = full_optimizer_state(self.optimizer, self.model, self.groups)
        if not self.groups.is_main:
            return None
        state = {
            "step": self.step,
            "train_s": self.train_s,
            "optimizer": optimizer,
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "python_rng": _python_rng_state(),
            "evals": [dict(e) for e in self.evals],
            "guard": self.guard.state_dict(),
            "collapse": self.collapse.state_dict(),
        }
        return save_checkpoint(
            self.run_dir / "checkpoints",
            self.step,
            weights,
            state,
            keep=self.cfg.train.keep_checkpoints,
        )

    def _resume(self) -> None:
        found = resumable_checkpoint(self.run_dir / "checkpoints", self._say)
        if found is None:
            raise FileNotFoundError(f"--resume: {self.run_dir}/checkpoints has no checkpoint yet")
        path, weights, state = found
        check_fits(full_state_dict(self.model, self.groups), weights, path / "model.safetensors")
        load_sharded(self.model, weights, self.groups)
        g = self.groups
        self.optimizer.load_state_dict(
            shard_optimizer_state(state["optimizer"], self.optimizer, self.model, g)
        )
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(_python_rng_from_state(state["python_rng"]))
        self.step, self.evals = int(state["step"]), list(state["evals"])
        self.train_s = float(state["train_s"])
        if "guard" in state:  # checkpoints from before the guard have none
            self.guard.load_state_dict(state["guard"])
            self.collapse.load_state_dict(state["collapse"])
        if self.groups.is_main:
            _truncate_metrics(self.metrics_path, self.step)


def _adamw(model: nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    # Decay matrices (and stacked expert weights); never norms, biases or 1-D parameters.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    o = cfg.optim
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": o.weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=o.lr,
        betas=(o.beta1, o.beta2),
        foreach=True,
    )


def _mean_over_ranks(values: list[torch.Tensor], groups: ParallelGroups) -> list[float]:
    """Each scalar averaged over all ranks (what one process on the whole batch would log)."""
    stacked = torch.stack([v.detach().float() for v in values])
    if groups.distributed:
        dist.all_reduce(stacked)
        stacked /= groups.world_size
    return stacked.tolist()


def _dropped_fraction(model: nn.Module) -> float:
    stats = [m.last_stats for m in model.modules() if isinstance(m, MoE) and m.last_stats]
    return sum(s.dropped_fraction for s in stats) / len(stats) if stats else 0.0


def _python_rng_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _python_rng_from_state(state: list) -> tuple:
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def _describe(event: dict[str, Any]) -> str:
    if event["event"] == "loss_spike":
        return (
            f"step {event['step']}: loss spike {event['loss']:.4f} (window mean "
            f"{event['window_mean']:.4f}, std {event['window_std']:.4f}, z={event['z']:.1f})"
        )
    return (
        f"step {event['step']}: router collapse in {event['layer']}: expert {event['expert']} "
        f"took {100 * event['share']:.1f}% of the tokens for {event['evals']} evaluations"
    )


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop rows an interrupted run logged after its last checkpoint (they are redone), and a
    last line that a kill cut short."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and row.get("step", step + 1) <= step:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept))


def _tensorboard_writer(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # TensorBoard is optional: metrics.jsonl always has everything
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))
