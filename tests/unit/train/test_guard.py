"""Guarded training: a non-finite step is skipped without touching the model (or stops the run
with a report), loss spikes and router collapse are logged."""

from __future__ import annotations

import json
import math

import pytest
import torch

import moesaic as ms
from moesaic.cli.common import friendly_errors
from moesaic.train.checkpoint import latest_checkpoint, read_checkpoint
from moesaic.train.config import apply_overrides
from moesaic.train.guard import CollapseWatch, GuardConfig, TrainingGuard, TrainingHalted
from moesaic.train.recipes import get_recipe
from moesaic.train.trainer import Trainer

FINITE = {"loss": 2.0, "ce": 1.9, "aux": 0.1}


def test_a_finite_step_is_applied_and_a_non_finite_one_skipped_and_counted():
    guard = TrainingGuard(GuardConfig())
    assert not guard.skip_step(1, FINITE, 0.5)
    assert guard.skip_step(2, {**FINITE, "loss": math.nan}, 0.5)
    assert guard.skip_step(3, FINITE, math.inf)  # finite loss, overflowing gradient
    assert guard.skipped == 2


def test_stop_mode_and_too_many_skips_halt_with_a_report():
    with pytest.raises(TrainingHalted, match=r"step 4: non-finite values \(loss=nan.*stop"):
        TrainingGuard(GuardConfig(nonfinite="stop")).skip_step(4, {**FINITE, "loss": math.nan}, 1)
    guard = TrainingGuard(GuardConfig(max_skipped=1))
    assert guard.skip_step(1, FINITE, math.nan)
    with pytest.raises(TrainingHalted, match="2 steps skipped so far, more than guard.max_skipped"):
        guard.skip_step(2, FINITE, math.nan)


def test_the_cli_reports_a_halted_run_in_one_line_with_status_3(capsys):
    @friendly_errors("moesaic train")
    def main(argv=None):
        raise TrainingHalted("step 4: non-finite values")

    assert main([]) == 3
    assert capsys.readouterr().err == "moesaic train: stopped: step 4: non-finite values\n"


def test_a_spike_is_a_loss_above_mean_plus_z_std_of_the_window():
    guard = TrainingGuard(GuardConfig(spike_window=4, spike_z=2.0))
    for step, loss in enumerate([1.0, 1.2, 1.0, 1.2], 1):
        assert guard.spike(step, loss) is None  # the window fills first
    # window [1.0, 1.2, 1.0, 1.2]: mean 1.1, std 0.1, threshold 1.3
    assert guard.spike(5, 1.29) is None
    # window now [1.2, 1.0, 1.2, 1.29]: mean 1.1725; squared deviations 0.00075625 +
    # 0.02975625 + 0.00075625 + 0.01380625 = 0.045075, std sqrt(0.045075 / 4) = 0.1062;
    # threshold 1.385
    event = guard.spike(6, 1.6)
    assert event["event"] == "loss_spike" and event["step"] == 6
    assert event["window_mean"] == pytest.approx(1.1725)
    assert event["window_std"] == pytest.approx(math.sqrt(0.045075 / 4))
    assert guard.window == [1.0, 1.2, 1.29, 1.6]


def _collapsing_model(balanced: bool) -> torch.nn.Module:
    layer = ms.MoE(4, 8, 4, router="hash" if balanced else "topk", top_k=1)
    if not balanced:
        with torch.no_grad():  # every positive input prefers expert 2
            layer.router.gate.weight.zero_()
            layer.router.gate.weight[2] = 10.0
    return torch.nn.Sequential(layer)


@pytest.mark.parametrize("balanced", [False, True])
def test_router_collapse_is_reported_after_n_evaluations_in_a_row(balanced):
    model = _collapsing_model(balanced)
    watch = CollapseWatch(GuardConfig(collapse_share=0.9, collapse_evals=3), model)
    reports = []
    for evaluation in range(1, 5):
        model(torch.rand(16, 4) + 0.1)
        watch.record()
        reports.append(watch.at_eval(evaluation * 10))
    if balanced:
        assert reports == [[], [], [], []]
    else:
        assert reports[:2] == [[], []]
        assert reports[2] == [
            {
                "step": 30,
                "event": "router_collapse",
                "layer": "0",
                "expert": 2,
                "share": 1.0,
                "evals": 3,
            }
        ]
        assert reports[3][0]["evals"] == 4


def _trainer(tmp_path, *overrides):
    cfg = apply_overrides(
        get_recipe("lm-moe-test"),
        ["train.steps=6", "train.eval_every=3", "train.checkpoint_every=3", *overrides],
    )
    return Trainer(cfg, tmp_path / "run", progress=False)


def _inject(trainer, bad_step, where):
    """A NaN in the loss, or in one gradient only (the loss stays finite), at ``bad_step``."""
    if where == "loss":
        real = trainer.model.loss
        trainer.model.loss = lambda x, y: (
            real(x, y) * (math.nan if trainer.step + 1 == bad_step else 1.0)
        )
    else:
        trainer.model.embed.weight.register_hook(
            lambda g: g * math.nan if trainer.step + 1 == bad_step else g
        )


@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_a_skipped_step_leaves_weights_and_optimizer_untouched(tmp_path, capfd, where):
    trainer = _trainer(tmp_path)
    _inject(trainer, 3, where)
    trainer.fit(max_steps=2)
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    moments = [
        {k: v.clone() for k, v in s.items()}
        for s in trainer.optimizer.state_dict()["state"].values()
    ]
    trainer.fit(max_steps=1)
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, weights[name]), name
    for before, after in zip(moments, trainer.optimizer.state_dict()["state"].values()):
        assert all(torch.equal(before[k], after[k]) for k in before)
    trainer.fit()
    assert trainer.step == 6 and all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert not all(torch.equal(v, weights[k]) for k, v in trainer.model.state_dict().items())
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    skipped = [r for r in rows if r.get("skipped")]
    assert [(r["step"], r["skipped_steps"]) for r in skipped] == [(3, 1)]
    assert "step 3: non-finite loss or gradients, step skipped (1 so far)" in capfd.readouterr().err
    _, state = read_checkpoint(latest_checkpoint(tmp_path / "run" / "checkpoints"))
    assert state["guard"]["skipped"] == 1


def test_stop_mode_halts_before_the_update_and_keeps_the_last_checkpoint(tmp_path):
    trainer = _trainer(tmp_path, "guard.nonfinite=stop")
    _inject(trainer, 5, "loss")
    with pytest.raises(TrainingHalted, match="step 5: non-finite values"):
        trainer.fit()
    assert trainer.step == 4
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").name == "step-000003"
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["event"] == "halted" and last["step"] == 5 and "loss=nan" in last["reason"]


def test_the_trainer_logs_spikes_and_collapse_as_metrics_events(tmp_path, capfd):
    # any expert holds >= 1/4 of a 4-expert layer's tokens, so a 1% share limit always trips
    trainer = _trainer(
        tmp_path,
        "guard.spike_window=3",
        "guard.spike_z=1",
        "guard.collapse_share=0.01",
        "guard.collapse_evals=2",
    )
    real = trainer.model.loss
    trainer.model.loss = lambda x, y: real(x, y) * (5.0 if trainer.step + 1 == 5 else 1.0)
    trainer.fit()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    events = [(r["step"], r["event"]) for r in rows if "event" in r]
    assert events == [(5, "loss_spike"), (6, "router_collapse")]
    collapse = rows[-1]
    assert collapse["layer"] == "blocks.1.ffn" and collapse["evals"] == 2
    assert 0.25 <= collapse["share"] <= 1
    err = capfd.readouterr().err
    assert "step 5: loss spike" in err and "step 6: router collapse in blocks.1.ffn" in err
