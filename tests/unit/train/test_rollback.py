"""An update that leaves non-finite weights is rolled back: the run returns to its last good state
(checkpoint, or the initial state before the first one) and replays with that update left out,
ending exactly where a run whose guard skipped that step ends. Nothing non-finite is ever
checkpointed, and a halted run says truthfully which checkpoint it can resume from."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from moesaic.models.registry import create
from moesaic.train.checkpoint import (
    NonFiniteWeightsError,
    list_checkpoints,
    read_checkpoint,
    save_checkpoint,
)
from moesaic.train.config import apply_overrides
from moesaic.train.guard import TrainingHalted
from moesaic.train.recipes import get_recipe
from moesaic.train.trainer import Trainer

SETTINGS = [
    "train.steps=8",
    "train.eval_every=4",
    "train.checkpoint_every=3",
    "train.log_every=1",
    "train.threads=1",
]


def _trainer(run_dir, *overrides, resume=False):
    cfg = apply_overrides(get_recipe("lm-moe-test"), [*SETTINGS, *overrides])
    return Trainer(cfg, run_dir, progress=False, resume=resume)


@pytest.fixture
def poison_update():
    """``poison_update(trainer, step)``: the optimizer's update at ``step`` writes an inf into
    one weight (whatever optimizer object the trainer holds after a rollback)."""
    handles = []

    def arm(trainer, bad_step, value=math.inf):
        def hook(optimizer, args, kwargs):
            if trainer.step + 1 == bad_step and optimizer is trainer.optimizer:
                with torch.no_grad():
                    trainer.model.blocks[0].attn.qkv.weight[0, 0] = value

        handles.append(register_optimizer_step_post_hook(hook))

    yield arm
    for handle in handles:
        handle.remove()


def _skip_reference(run_dir, bad_step):
    """The same run with step ``bad_step`` skipped by the guard (a NaN loss there)."""
    trainer = _trainer(run_dir)
    real = trainer.model.loss
    trainer.model.loss = lambda x, y: (
        real(x, y) * (math.nan if trainer.step + 1 == bad_step and trainer.model.training else 1.0)
    )
    trainer.fit()
    return trainer


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("bad_step", [2, 5], ids=["before-first-checkpoint", "after-checkpoint"])
def test_a_non_finite_update_is_rolled_back_and_replayed_as_a_skipped_step(
    tmp_path, poison_update, capfd, bad_step
):
    trainer = _trainer(tmp_path / "run")
    poison_update(trainer, bad_step)
    trainer.fit()
    reference = _skip_reference(tmp_path / "ref", bad_step)
    assert trainer.step == 8
    for (name, a), b in zip(
        trainer.model.state_dict().items(), reference.model.state_dict().values()
    ):
        assert torch.equal(a, b), name
    got, want = _rows(tmp_path / "run"), _rows(tmp_path / "ref")
    losses = [(r["step"], r["loss"]) for r in got if "loss" in r and r["step"] != bad_step]
    assert losses == [(r["step"], r["loss"]) for r in want if "loss" in r and r["step"] != bad_step]
    assert [r["step"] for r in got if "loss" in r] == list(range(1, 9))  # no duplicate steps
    (event,) = [r for r in got if r.get("event") == "rollback"]
    assert event["step"] == bad_step and event["to_step"] == (0 if bad_step < 3 else 3)
    assert "blocks.0.attn.qkv.weight" in event["parameters"]
    where = "the initial state (step 0)" if bad_step < 3 else "checkpoint step-000003 (step 3)"
    assert f"rolled back to {where}" in capfd.readouterr().err
    for path in list_checkpoints(tmp_path / "run" / "checkpoints"):
        weights, state = read_checkpoint(path)
        assert all(torch.isfinite(w).all() for w in weights.values()), path
        assert state["guard"]["bad_updates"] == [bad_step]


def test_a_run_resumed_after_a_rollback_is_bit_identical(tmp_path, poison_update):
    whole = _trainer(tmp_path / "whole")
    poison_update(whole, 5)
    whole.fit()
    part = _trainer(tmp_path / "part")
    poison_update(part, 5)
    part.fit(max_steps=6)  # rolled back at 5, stopped (checkpointed) at 6
    resumed = _trainer(tmp_path / "part", resume=True)
    assert resumed.step == 6 and resumed.guard.bad_updates == {5}
    resumed.fit()
    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_stop_mode_halts_on_a_non_finite_update_and_names_the_real_checkpoint(
    tmp_path, poison_update
):
    early = _trainer(tmp_path / "early", "guard.nonfinite=stop")
    poison_update(early, 2)
    with pytest.raises(TrainingHalted, match="No checkpoint was written yet") as info:
        early.fit()
    assert "step 2: the update made the weights non-finite (blocks.0.attn.qkv.weight)" in str(
        info.value
    )
    assert not list_checkpoints(tmp_path / "early" / "checkpoints")
    late = _trainer(tmp_path / "late", "guard.nonfinite=stop")
    poison_update(late, 5)
    with pytest.raises(TrainingHalted, match="The newest checkpoint, step-000003, is intact"):
        late.fit()
    assert [p.name for p in list_checkpoints(tmp_path / "late" / "checkpoints")] == ["step-000003"]


def test_too_many_rolled_back_updates_halt_the_run(tmp_path, poison_update):
    trainer = _trainer(tmp_path / "run", "guard.max_skipped=2")
    for step, value in ((2, math.inf), (4, math.nan), (5, -math.inf)):
        poison_update(trainer, step, value)
    with pytest.raises(TrainingHalted, match="3 updates left out so far, more than"):
        trainer.fit()


def test_a_non_finite_validation_loss_halts_without_a_checkpoint_at_that_step(tmp_path):
    trainer = _trainer(tmp_path / "run")
    real = trainer.model.loss
    trainer.model.loss = lambda x, y: real(x, y) * (1.0 if trainer.model.training else math.inf)
    with pytest.raises(TrainingHalted, match="step 4: the validation loss is inf"):
        trainer.fit()
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step-000003"]


def test_save_checkpoint_refuses_non_finite_weights_before_writing(tmp_path):
    model = create("lm-moe-test")
    with torch.no_grad():
        model.head.weight[1, 2] = math.nan
    with pytest.raises(NonFiniteWeightsError, match="step 7: refusing .* non-finite .*head.weight"):
        save_checkpoint(tmp_path, 7, model, {"step": 7})
    assert not any(tmp_path.iterdir())


def test_the_check_finds_nan_and_inf_and_clears_large_finite_weights(tmp_path):
    trainer = _trainer(tmp_path / "run")
    assert trainer._nonfinite_parameters() == []
    w = trainer.model.blocks[0].attn.proj.weight
    with torch.no_grad():
        w.fill_(3e38)  # finite, but the tensor's sum overflows: the screen trips, the check clears
        assert not torch.isfinite(w.sum())
        assert trainer._nonfinite_parameters() == []
        w.fill_(0.0)
        w[1, 1] = math.nan
        assert trainer._nonfinite_parameters() == ["blocks.0.attn.proj.weight"]
