"""Guarded training: non-finite steps, loss spikes and router collapse, configured by ``guard.*``.

- A step whose loss or gradient norm is not finite is skipped (no optimizer update; counted and
  logged as a metrics row with ``"skipped": true``) or stops the run with a report
  (``guard.nonfinite="stop"``, or more than ``guard.max_skipped`` skips): ``TrainingHalted``.
- A finite step whose update leaves non-finite weights cannot be skipped after the fact: the
  trainer rolls the run back to its last good state (checkpoint, or the initial state) and
  replays it with that step's update left out (``bad_update``), so the replay is the run in
  which the guard had skipped it. Non-finite weights are never checkpointed.
- A loss above ``mean + spike_z * std`` of the previous ``spike_window`` losses is a spike: logged
  (``"event": "loss_spike"``), training goes on.
- One expert receiving more than ``collapse_share`` of an MoE layer's tokens (training tokens
  since the previous evaluation) for ``collapse_evals`` evaluations in a row is a router collapse:
  logged (``"event": "router_collapse"``) at each such evaluation.

Every counter is part of the checkpoint, so a resumed run logs exactly what an uninterrupted
one would.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from moesaic._validate import check_choice, check_nonnegative_float, check_positive_int

__all__ = ["GuardConfig", "TrainingGuard", "CollapseWatch", "TrainingHalted"]


class TrainingHalted(RuntimeError):
    """Training stopped on purpose (non-finite values); the message is the report."""


@dataclasses.dataclass(kw_only=True)
class GuardConfig:
    nonfinite: str = "skip"  # "skip" | "stop": what a non-finite loss or gradient does
    max_skipped: int = 20  # stop anyway after this many skipped steps
    spike_window: int = 50  # losses the spike detector compares against
    spike_z: float = 6.0  # a spike is loss > mean + spike_z * std (0 disables)
    collapse_share: float = 0.9  # share of a layer's tokens one expert may take
    collapse_evals: int = 3  # consecutive evaluations over that share before reporting

    def __post_init__(self) -> None:
        check_choice("guard.nonfinite", self.nonfinite, ("skip", "stop"))
        if isinstance(self.max_skipped, bool) or not isinstance(self.max_skipped, int):
            raise TypeError(f"guard.max_skipped={self.max_skipped!r} must be an int")
        if self.max_skipped < 0:
            raise ValueError(f"guard.max_skipped={self.max_skipped} must be >= 0")
        check_positive_int("guard.spike_window", self.spike_window)
        if self.spike_window < 2:
            raise ValueError(f"guard.spike_window={self.spike_window} must be >= 2")
        check_nonnegative_float("guard.spike_z", self.spike_z)
        check_nonnegative_float("guard.collapse_share", self.collapse_share)
        if not 0 < self.collapse_share <= 1:
            raise ValueError(f"guard.collapse_share={self.collapse_share} must be in (0, 1]")
        check_positive_int("guard.collapse_evals", self.collapse_evals)


class TrainingGuard:
    """Decides, from the (rank-averaged) loss and the global gradient norm, whether a step is
    applied, and watches the loss for spikes."""

    def __init__(self, cfg: GuardConfig) -> None:
        self.cfg = cfg
        self.skipped = 0
        self.window: list[float] = []
        self.bad_updates: set[int] = set()  # steps whose update made the weights non-finite

    def skip_step(self, step: int, losses: dict[str, float], grad_norm: float) -> bool:
        """True when step ``step`` must not update the model; raises ``TrainingHalted`` when the
        run must stop instead. The trainer adds which checkpoint a halted run can resume from."""
        values = {**losses, "grad_norm": grad_norm}
        if step in self.bad_updates:
            what = "its update made the weights non-finite before a rollback"
        elif all(math.isfinite(v) for v in values.values()):
            return False
        else:
            what = "non-finite values (" + ", ".join(f"{k}={v:.6g}" for k, v in values.items())
            what += ")"
        self.skipped += 1
        if self.cfg.nonfinite == "stop" and step not in self.bad_updates:
            raise TrainingHalted(f"step {step}: {what}; stopped because guard.nonfinite='stop'.")
        if self.skipped > self.cfg.max_skipped:
            raise TrainingHalted(
                f"step {step}: {what}; {self.skipped} steps skipped so far, more than "
                f"guard.max_skipped={self.cfg.max_skipped}."
            )
        return True

    def bad_update(self, step: int, names: list[str]) -> None:
        """Step ``step``'s update made parameters ``names`` non-finite: remember to leave it out
        when the run is replayed from its last good state; raises ``TrainingHalted`` when the run
        must stop instead (``guard.nonfinite='stop'``, or too many steps left out)."""
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        what = f"step {step}: the update made the weights non-finite ({shown})"
        if self.cfg.nonfinite == "stop":
            raise TrainingHalted(f"{what}; stopped because guard.nonfinite='stop'.")
        self.bad_updates.add(step)
        if len(self.bad_updates) > self.cfg.max_skipped:
            raise TrainingHalted(
                f"{what}; {len(self.bad_updates)} updates left out so far, more than "
                f"guard.max_skipped={self.cfg.max_skipped}."
            )

    def spike(self, step: int, loss: float) -> dict[str, Any] | None:
        """A ``loss_spike`` event row when ``loss`` is a spike against the window, else None;
        then ``loss`` joins the window."""
        event = None
        if self.cfg.spike_z > 0 and len(self.window) == self.cfg.spike_window:
            mean = sum(self.window) / len(self.window)
            std = math.sqrt(sum((v - mean) ** 2 for v in self.window) / len(self.window))
            if loss > mean + self.cfg.spike_z * std and std > 0:
                event = {
                    "step": step,
                    "event": "loss_spike",
                    "loss": loss,
                    "window_mean": mean,
                    "window_std": std,
                    "z": (loss - mean) / std,
                }
        self.window = (self.window + [loss])[-self.cfg.spike_window :]
        return event

    def state_dict(self) -> dict[str, Any]:
        return {
            "skipped": self.skipped,
            "window": list(self.window),
            "bad_updates": sorted(self.bad_updates),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped = int(state["skipped"])
        self.window = [float(v) for v in state["window"]]
        self.bad_updates = {int(s) for s in state.get("bad_updates", [])}


class CollapseWatch:
    """Counts each MoE layer's training tokens per expert between evaluations and reports a
    layer whose busiest expert holds more than ``collapse_share`` of them ``collapse_evals``
    evaluations in a row."""

    def __init__(self, cfg: GuardConfig, model: nn.Module) -> None:
        from moesaic.layer import MoE

        self.cfg = cfg
        self.layers = {name: m for name, m in model.named_modules() if isinstance(m, MoE)}
        self.counts = {
            name: torch.zeros(m.num_experts, dtype=torch.long) for name, m in self.layers.items()
        }
        self.streak = dict.fromkeys(self.layers, 0)

    def record(self) -> None:
        """Add the last forward's kept assignments per expert (call after each training step)."""
        for name, layer in self.layers.items():
            if layer.last_stats is not None:
                self.counts[name] += layer.last_stats.tokens_per_expert.cpu()

    def at_eval(self, step: int, distributed: bool = False) -> list[dict[str, Any]]:
        """Event rows for the collapsed layers; resets the counts (collective when
        ``distributed``: the counts are summed over ranks)."""
        events = []
        for name, counts in self.counts.items():
            if distributed:
                dist.all_reduce(counts)
            total = int(counts.sum())
            share = float(counts.max()) / total if total else 0.0
            self.streak[name] = self.streak[name] + 1 if share > self.cfg.collapse_share else 0
            if self.streak[name] >= self.cfg.collapse_evals:
                events.append(
                    {
                        "step": step,
                        "event": "router_collapse",
                        "layer": name,
                        "expert": int(counts.argmax()),
                        "share": share,
                        "evals": self.streak[name],
                    }
                )
            counts.zero_()
        return events

    def state_dict(self) -> dict[str, Any]:
        return {
            "counts": {k: v.clone() for k, v in self.counts.items()},
            "streak": dict(self.streak),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in self.counts:
            if name in state["counts"]:
                self.counts[name] = state["counts"][name].clone()
                self.streak[name] = int(state["streak"][name])
