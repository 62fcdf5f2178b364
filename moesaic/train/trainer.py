"""The training loop: AdamW, warm-up + cosine, clipping, aux losses, evals, checkpoints, resume.

``Trainer(cfg, run_dir).fit()`` trains ``cfg`` and writes everything to ``run_dir``
(moesaic/train/checkpoint.py shows the layout). ``resume=True`` continues from the newest
checkpoint and, on the same machine and thread count, produces bit-identical losses and weights
to a run that was never interrupted: weights, optimizer, scheduler, RNG and the data cursor are
all part of the checkpoint. Resuming takes the newest checkpoint that verifies (falling back past
damaged ones, and saying so). The guard (moesaic/train/guard.py) skips or stops on non-finite
steps, rolls back an update that left non-finite weights, and logs loss spikes and router
collapse as metrics events.

What a run never loses:
- SIGINT (Ctrl-C) and SIGTERM (what schedulers and containers send on preemption) take effect at
  the next step boundary: the step in flight finishes, the same checkpoint as a scheduled one is
  written, and ``fit`` raises ``TrainingInterrupted``; a resumed run is then bit-identical to an
  uninterrupted one. A second Ctrl-C stops at once, leaving the previous checkpoint.
- One process at a time trains in a run directory (``moesaic.train.runlock``); a fresh start
  refuses a directory that already holds checkpoints.
- Every run file (config, metrics, tokenizer, routing log) is replaced atomically.
- ``check_resources`` refuses a run that cannot fit in memory before any work.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import signal
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
from moesaic.parallel import (
    ParallelGroups,
    clip_grad_norm,
    full_optimizer_state,
    full_state_dict,
    global_shapes,
    load_sharded,
    local_tensor,
    shard_model,
    shard_optimizer_state,
    single_process,
    sync_gradients,
)
from moesaic.parallel.dcp import load_state as load_dcp_state
from moesaic.routing.topk import balance_routers, reset_balance_counts, update_balance_biases
from moesaic.train.checkpoint import (
    CheckpointError,
    ShardedWeights,
    check_fits,
    list_checkpoints,
    remove_stale_files,
    resumable_checkpoint,
    save_checkpoint,
    save_sharded_checkpoint,
    write_atomic,
)
from moesaic.train.config import ConfigError, RunConfig, config_to_dict
from moesaic.train.data import PreparedData
from moesaic.train.guard import CollapseWatch, TrainingGuard, TrainingHalted
from moesaic.train.resources import busy_cores_warning, check_resources
from moesaic.train.runlock import RunDirError, RunLock
from moesaic.train.signals import signal_handlers
from moesaic.train.tasks import Task, build_model, evaluate, task_for

__all__ = [
    "Trainer",
    "TrainResult",
    "TrainingInterrupted",
    "build_model",
    "evaluate",
    "lr_factor",
]

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# What a checkpoint's state must hold for an exact resume.
RESUME_KEYS = ("optimizer", "scheduler", "sampler", "torch_rng", "python_rng", "evals", "train_s")


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped ``fit`` at a step boundary after a checkpoint was written.

    ``signum`` is the signal; ``step`` the step the run stopped at; ``checkpoint`` the
    checkpoint directory written (None on non-main ranks of a distributed run)."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        saved = f"checkpoint {checkpoint.name} saved" if checkpoint else "checkpoint saved"
        super().__init__(
            f"{signal.Signals(signum).name} at step {step}: {saved}; continue with --resume"
        )


@dataclasses.dataclass
class TrainResult:
    run_dir: Path
    steps: int
    val_loss: float
    tokens_per_s: float  # training speed in the task's unit (tokens; examples for a classifier)
    params: ParameterCount
    wall_s: float
    evals: list[dict[str, Any]]
    trained_steps: int = 0  # steps trained by this call (0: the run had already finished)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from 1 to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class Trainer:
    """Train one ``RunConfig`` into ``run_dir``.

    Args:
        cfg: the run's configuration.
        run_dir: where config, metrics, checkpoints and the tokenizer go.
        resume: continue from ``run_dir``'s newest checkpoint.
        progress: show a tqdm bar (loss, tokens/s, dropped-token %).
        data: already prepared data (``moesaic compare`` shares it between its two runs).
        task: what is trained (moesaic/train/tasks.py); None takes ``task_for(cfg, data)``:
            language modelling, or classification for a config with a ``finetune`` section.
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
        task: Task | None = None,
    ) -> None:
        self.groups = groups = groups or single_process()
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.progress = progress and groups.is_main
        if groups.expert_size != cfg.parallel.expert:
            raise ValueError(
                f"parallel.expert={cfg.parallel.expert} but the process groups were built with "
                f"expert size {groups.expert_size}"
            )
        if groups.distributed and groups.shard_size != cfg.parallel.shard:
            raise ValueError(
                f"parallel.shard={cfg.parallel.shard} but the process groups were built with "
                f"shard size {groups.shard_size}"
            )
        check_resources(cfg)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._lock = RunLock(self.run_dir)
        if groups.is_main:  # before anything in the directory is written or removed
            self._lock.acquire()
            remove_stale_files(self.run_dir)
            existing = [] if resume else list_checkpoints(self.run_dir / "checkpoints")
            if existing:
                self._lock.release()
                raise RunDirError(
                    f"{self.run_dir} already holds a run (newest checkpoint {existing[-1].name}); "
                    f"--resume continues it; another directory starts a new one"
                )
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        busy = busy_cores_warning(torch.get_num_threads()) if groups.is_main else None
        if busy:
            print(f"moesaic: warning: {busy}", file=sys.stderr, flush=True)
        torch.manual_seed(cfg.train.seed)
        random.seed(cfg.train.seed)
        np.random.seed(cfg.train.seed)
        self.task = task or task_for(cfg, data)
        self.task.prepare(self.run_dir, groups.is_main)
        self.data = getattr(self.task, "data", None)  # a language-modelling run's corpus
        self.model = self.task.build_model(groups.expert_group)
        if cfg.train.checkpoint_activations:
            _checkpoint_activations(self.model)
        if groups.sharded:  # FSDP2: dense parameters sharded, gradients reduced by FSDP
            shard_model(self.model, groups)
        # auxiliary-loss-free balancing: the routers' biases move after every optimizer step
        self._balances = bool(balance_routers(self.model))
        self._new_optimizer()
        self.guard = TrainingGuard(cfg.guard)
        self.collapse = CollapseWatch(cfg.guard, self.model)
        self.sampler = self.task.sampler(groups.rank, groups.world_size)
        self.val_batches = self.task.eval_batches()
        self.step = 0
        self.train_s = 0.0  # cumulative seconds spent in training steps (not evals, not saves)
        self.evals: list[dict[str, Any]] = []
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self._stop_signal: int | None = None
        self._saved_step: int | None = None
        self._saved_path: Path | None = None
        self._initial: dict[str, Any] | None = None  # the state a rollback returns to
        if resume:
            self._resume()
        else:
            self._initial = self._snapshot()
            if groups.is_main:
                write_atomic(self.metrics_path, "")
        if groups.is_main:
            write_atomic(self.run_dir / "config.json", json.dumps(config_to_dict(cfg), indent=1))
        self._tensorboard = _tensorboard_writer(self.run_dir) if groups.is_main else None
        self.routing_log = self._routing_log()

    def _new_optimizer(self) -> None:
        """A fresh AdamW and its warm-up + cosine schedule (at the start, and before loading a
        checkpoint's or the initial state's)."""
        o, t = self.cfg.optim, self.cfg.train
        self.optimizer = _adamw(self.model, self.cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, o.warmup_steps, t.steps, o.min_lr_ratio)
        )

    def _routing_log(self) -> RoutingLog:
        t = self.cfg.train
        return RoutingLog(
            self.run_dir,
            self.task.labels,
            t.log_every,
            t.steps,
            self.step,
            self.groups.is_main,
        )

    def fit(self, max_steps: int | None = None) -> TrainResult:
        """Train to ``train.steps`` (or stop, checkpointed, after ``max_steps`` more steps)."""
        cfg, model = self.cfg, self.model
        stop_at = (
            cfg.train.steps if max_steps is None else min(cfg.train.steps, self.step + max_steps)
        )
        units_per_step, unit = self.task.units_per_step, self.task.unit
        rate_key = "tok_s" if unit == "tokens" else f"{unit[:2]}_s"
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
        if self.groups.is_main:
            self._lock.acquire()
        try:
            with self._stop_signals():
                while self.step < stop_at:
                    t0 = time.perf_counter()
                    row = self._train_step()
                    elapsed = time.perf_counter() - t0
                    if "rollback" in row:
                        self._rollback(row["rollback"], row["bad"])
                        bar.reset(total=cfg.train.steps)
                        bar.update(self.step)
                        continue
                    session_s += elapsed
                    self.train_s += elapsed
                    trained_steps += 1
                    self.step += 1
                    row[f"{unit}_per_s"] = trained_steps * units_per_step / session_s
                    events = row.pop("events")
                    stop = row.pop("stop")
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
                        **{rate_key: f"{row[f'{unit}_per_s']:.0f}"},
                        drop=f"{100 * row['dropped']:.1f}%",
                    )
                    if self.step % cfg.train.eval_every == 0 or self.step == cfg.train.steps:
                        self._eval()
                    if self.step % cfg.train.checkpoint_every == 0 or self.step in (
                        cfg.train.steps,
                        stop_at,
                    ):
                        self.save()
                    if stop or (not self.groups.distributed and self._stop_signal is not None):
                        self._stop_now()
                if self._stop_signal is not None:  # arrived during the last step's eval or save
                    self._stop_now()
        except TrainingHalted as err:  # the report goes into the metrics too
            report = TrainingHalted(f"{err} {self._resume_note()}")
            self._log({"step": self.step + 1, "event": "halted", "reason": str(report)})
            raise report from None
        finally:
            bar.close()
            self.routing_log.flush()
            if self._tensorboard is not None:
                self._tensorboard.flush()
            self._lock.release()
        tok_s = trained_steps * units_per_step / session_s if session_s else 0.0
        return TrainResult(
            run_dir=self.run_dir,
            steps=self.step,
            val_loss=self.evals[-1]["val_loss"] if self.evals else float("nan"),
            tokens_per_s=tok_s,
            params=count_parameters(model),
            wall_s=time.perf_counter() - start,
            evals=self.evals,
            trained_steps=trained_steps,
        )

    def close(self) -> None:
        """Release the run directory's lock before ``fit`` would (a Trainer built only to
        evaluate or inspect a run); ``fit`` takes it again."""
        self._lock.release()

    def _stop_signals(self):
        """SIGINT and SIGTERM only set a flag that the loop reads at the next step boundary;
        a second SIGINT raises KeyboardInterrupt at once (the previous checkpoint stays)."""

        def handler(signum: int, frame: object) -> None:
            if self._stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self._stop_signal = signum
            if self.groups.is_main:  # os.write: safe even if the signal interrupted a print
                note = (
                    f"\nmoesaic: {signal.Signals(signum).name} received: stopping after the "
                    f"current step and saving a checkpoint (Ctrl-C again stops at once)\n"
                )
                try:
                    os.write(2, note.encode())
                except OSError:
                    pass

        return signal_handlers(STOP_SIGNALS, handler)

    def _stop_now(self) -> None:
        """Checkpoint the finished step (unless it just was) and raise TrainingInterrupted."""
        path = self.save() if self._saved_step != self.step else self._saved_path
        signum = self._stop_signal if self._stop_signal is not None else signal.SIGTERM
        raise TrainingInterrupted(signum, self.step, path)

    def _resume_note(self) -> str:
        found = list_checkpoints(self.run_dir / "checkpoints")
        if not found:
            return "No checkpoint was written yet: fix the cause and start the run again."
        return f"The newest checkpoint, {found[-1].name}, is intact: fix the cause and --resume."

    def _train_step(self) -> dict[str, Any]:
        batch = self.sampler.next_batch()
        objective, logs = self.task.loss(self.model, batch, self.step + 1)
        self.routing_log.record(self.step + 1, self.model, batch)
        aux = aux_loss(self.model)
        loss = objective + aux
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # The global norm (every rank gets the same), clipping only when grad_clip > 0.
        if not self.groups.sharded:  # FSDP has reduced the gradients during backward
            sync_gradients(self.model, self.groups)
        grad_norm = clip_grad_norm(self.model, self.cfg.optim.grad_clip or math.inf, self.groups)
        # The stop flag rides along, so every rank stops after the same step.
        flag = torch.tensor(float(self._stop_signal is not None))
        names = list(logs)
        loss_v, aux_v, stop_v, *values = _mean_over_ranks(
            [loss, aux, flag, *logs.values()], self.groups
        )
        logged = dict(zip(names, values))
        step = self.step + 1
        skip = self.guard.skip_step(step, {"loss": loss_v, **logged, "aux": aux_v}, grad_norm)
        if skip:  # no update at all: weights, moments and balance biases stay as they were
            self.optimizer.zero_grad(set_to_none=True)
            if self._balances:
                reset_balance_counts(self.model)
        else:
            self.optimizer.step()
            bad = self._nonfinite_parameters()
            if bad:
                self.guard.bad_update(step, bad)  # raises TrainingHalted when it must stop
                return {"rollback": step, "bad": bad}
            if self._balances:  # the loads of this step's batch, summed over every rank
                update_balance_biases(
                    self.model, dist.group.WORLD if self.groups.distributed else None
                )
            self.collapse.record()
        self.scheduler.step()  # the schedule follows the step count, skipped or not
        row = {
            "step": step,
            "loss": loss_v,
            **logged,
            "aux": aux_v,
            "grad_norm": grad_norm,
            "lr": self.scheduler.get_last_lr()[0],
            "dropped": _dropped_fraction(self.model),
            "stop": stop_v > 0,
        }
        if skip:
            row.update(skipped=True, skipped_steps=self.guard.skipped)
            why = (
                "its update was rolled back before"
                if step in self.guard.bad_updates
                else "non-finite loss or gradients"
            )
            self._say(f"step {step}: {why}, step skipped ({self.guard.skipped} so far)")
        spike = None if skip else self.guard.spike(step, loss_v)
        row["events"] = [spike] if spike else []
        return row

    def _nonfinite_parameters(self) -> list[str]:
        """Names of parameters holding inf or NaN after the update (any rank's, on every rank).
        A sum per tensor is the cheap screen (inf and NaN propagate into it; a sum that merely
        overflows is cleared by the exact check that follows); docs/performance.md has its cost
        next to a training step's."""
        params = list(self.model.named_parameters())
        local = [(n, local_tensor(p.detach())) for n, p in params]  # FSDP: this rank's shard
        sums = torch.stack([p.sum(dtype=torch.float32) for _, p in local])
        names = []
        if not bool(torch.isfinite(sums).all()):
            names = [n for n, p in local if not bool(p.isfinite().all())]
        if self.groups.distributed:
            flag = torch.tensor([float(bool(names))])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() and not names:
                names = ["(on another rank)"]
        return names

    def _eval(self) -> None:
        metrics = self.task.evaluate(self.model, self.val_batches)
        loss = metrics["val_loss"]
        if not math.isfinite(loss):  # finite weights can still give inf: never checkpoint it
            raise TrainingHalted(
                f"step {self.step}: the validation loss is {loss}: the weights are finite but "
                f"the model's outputs are not (too large a learning rate?); this step is not "
                f"checkpointed."
            )
        row = {"step": self.step, **metrics, "train_s": self.train_s}
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

    def _state(self, optimizer: dict[str, Any]) -> dict[str, Any]:
        """Everything but the weights that an exact resume needs (plain data: tensors, numbers,
        strings), and the run's config, which survives in every checkpoint should config.json
        be lost."""
        return {
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
            "config": json.dumps(config_to_dict(self.cfg)),
        }

    def save(self) -> Path | None:
        """Checkpoint (collective under expert parallelism; rank 0 writes). The files have the
        single-process layout whatever the expert-parallel size. An FSDP run writes a sharded
        DCP checkpoint instead (every rank its shard), loadable on any layout."""
        if self.groups.sharded:
            self._saved_step, self._saved_path = self.step, None
            self._saved_path = save_sharded_checkpoint(
                self.run_dir / "checkpoints",
                self.step,
                self.model,
                self.optimizer,
                self._state(optimizer={"param_groups": _hyperparameters(self.optimizer)}),
                self.groups,
                keep=self.cfg.train.keep_checkpoints,
            )
            self._initial = None
            return self._saved_path
        weights = full_state_dict(self.model, self.groups)
        optimizer = full_optimizer_state(self.optimizer, self.model, self.groups)
        self._saved_step, self._saved_path = self.step, None
        if not self.groups.is_main:
            return None
        self._saved_path = save_checkpoint(
            self.run_dir / "checkpoints",
            self.step,
            weights,
            self._state(optimizer),
            keep=self.cfg.train.keep_checkpoints,
        )
        self._initial = None  # from now on a rollback returns to a checkpoint
        return self._saved_path

    def _snapshot(self) -> dict[str, Any]:
        """The initial state, kept in memory until the first checkpoint (a copy of the
        weights; the optimizer has no state yet)."""
        return {
            "weights": {k: v.clone() for k, v in self.model.state_dict().items()},
            **self._state(optimizer=self.optimizer.state_dict()),
        }

    def _resume(self) -> None:
        expected = (
            global_shapes(self.model, self.groups)
            if self.groups.sharded
            else full_state_dict(self.model, self.groups)
        )

        def fits(weights: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
            check_fits(expected, weights, Path("model.safetensors"))
            missing = [k for k in RESUME_KEYS if k not in state]
            if missing:
                raise CheckpointError(f"state.pt lacks the training state {missing}")

        found = resumable_checkpoint(self.run_dir / "checkpoints", self._say, check=fits)
        if found is None:
            raise FileNotFoundError(f"--resume: {self.run_dir}/checkpoints has no checkpoint yet")
        path, weights, state = found
        self._restore(weights, state, sharded=False)
        self._saved_step, self._saved_path = self.step, path
        if self.groups.is_main:
            _truncate_metrics(self.metrics_path, self.step)

    def _restore(self, weights: dict[str, torch.Tensor], state: dict[str, Any], sharded: bool):
        """Load weights and training state (full single-process layout, or this rank's own
        tensors when ``sharded``)."""
        if isinstance(weights, ShardedWeights):  # a DCP checkpoint: on any layout
            self._new_optimizer()
            load_dcp_state(weights.directory, self.model, self.optimizer, self.groups)
            saved_groups = state["optimizer"]["param_groups"]
            for group, saved in zip(self.optimizer.param_groups, saved_groups, strict=True):
                # the update's implementation (foreach, fused) is this layout's own choice
                group.update({k: v for k, v in saved.items() if k not in _IMPLEMENTATION})
        elif self.groups.sharded and not sharded:
            raise CheckpointError(
                "this checkpoint was written without parallel.shard (model.safetensors): "
                "resume it with parallel.shard=0, or start the sharded run afresh"
            )
        else:
            if sharded:
                self.model.load_state_dict(weights)
            else:
                load_sharded(self.model, weights, self.groups)
            self._new_optimizer()
            optimizer = state["optimizer"]
            if not sharded:
                optimizer = shard_optimizer_state(
                    optimizer, self.optimizer, self.model, self.groups
                )
            self.optimizer.load_state_dict(optimizer)
        reset_balance_counts(self.model)  # not saved: zero at every step boundary
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(_python_rng_from_state(state["python_rng"]))
        self.step, self.evals = int(state["step"]), [dict(e) for e in state["evals"]]
        self.train_s = float(state["train_s"])
        if "guard" in state:  # checkpoints from before the guard have none
            self.guard.load_state_dict(state["guard"])
            self.collapse.load_state_dict(state["collapse"])

    def _rollback(self, bad_step: int, names: list[str]) -> None:
        """Step ``bad_step``'s update left non-finite weights: return to the newest good
        checkpoint (or the initial state) and replay with that update left out."""
        left_out = set(self.guard.bad_updates)
        if self._initial is not None:
            self._restore(self._initial["weights"], self._initial, sharded=True)
            where = "the initial state"
        else:
            found = resumable_checkpoint(self.run_dir / "checkpoints", self._say)
            if found is None:
                raise TrainingHalted(
                    f"step {bad_step}: the update made the weights non-finite and no good "
                    f"state is left to roll back to."
                )
            self._restore(found[1], found[2], sharded=False)
            where = f"checkpoint {found[0].name}"
            self._saved_step, self._saved_path = self.step, found[0]
        self.guard.bad_updates |= left_out
        if self.groups.is_main:
            _truncate_metrics(self.metrics_path, self.step)
        self.routing_log = self._routing_log()
        event = {
            "step": bad_step,
            "event": "rollback",
            "to_step": self.step,
            "parameters": names[:5],
        }
        self._log(event)
        self._say(
            f"step {bad_step}: the update made {len(names)} parameter tensor(s) non-finite "
            f"({', '.join(names[:3])}); rolled back to {where} (step {self.step}), replaying "
            f"without that update"
        )


def _checkpoint_activations(model: nn.Module) -> None:
    """Switch on per-block activation checkpointing in every Transformer LM of ``model``."""
    from moesaic.models.lm import MoELM

    lms = [m for m in model.modules() if isinstance(m, MoELM)]
    if not lms:
        raise ConfigError(
            f"train.checkpoint_activations=True: this run's model ({type(model).__name__}) "
            "holds no Transformer language model whose blocks it could checkpoint"
        )
    for lm in lms:
        lm.checkpoint_activations = True


def _adamw(model: nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    # Decay matrices (and stacked expert weights); never norms, biases or 1-D parameters.
    # Frozen parameters (prompt tuning, frozen routers) are not the optimizer's at all.
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    o = cfg.optim
    # One multi-tensor update per group, unless a group would mix FSDP's DTensors with plain
    # tensors (experts left out of FSDP when they have no replicas), which foreach refuses.
    sharded = {local_tensor(p) is not p for p in params}
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": o.weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=o.lr,
        betas=(o.beta1, o.beta2),
        foreach=len(sharded) < 2,
    )


_IMPLEMENTATION = {"foreach", "fused", "capturable", "differentiable"}


def _hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Each parameter group's settings (lr, betas, ...) without its parameters: what a sharded
    checkpoint's ``state.pt`` keeps of the optimizer (the moments are in DCP)."""
    return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]


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
    write_atomic(path, "".join(line + "\n" for line in kept))


def _tensorboard_writer(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # TensorBoard is optional: metrics.jsonl always has everything
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))
