"""End to end: the tiny recipe trains, resumes bit for bit, survives a failed save, and the
command line reports mistakes in one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from moesaic.train.checkpoint import CheckpointWriteError, latest_checkpoint, load_checkpoint
from moesaic.train.config import apply_overrides
from moesaic.train.recipes import get_recipe
from moesaic.train.trainer import Trainer, build_model


def _cfg(*overrides):
    return apply_overrides(get_recipe("lm-moe-test"), list(overrides))


def _losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("loss"), r.get("val_loss")) for r in rows]


def test_tiny_recipe_trains_and_validation_loss_falls(tmp_path):
    result = Trainer(_cfg(), tmp_path / "run", progress=False).fit()
    assert result.steps == 30
    first, last = result.evals[0]["val_loss"], result.evals[-1]["val_loss"]
    assert last < first - 0.3
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step-000030"


def test_resume_after_step_10_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    cfg = _cfg("model.moe.router=noisy_topk", "model.moe.top_k=2", "model.dropout=0.1")
    full = Trainer(cfg, tmp_path / "full", progress=False)
    full.fit()
    part = Trainer(cfg, tmp_path / "part", progress=False)
    part.fit(max_steps=10)
    resumed = Trainer(cfg, tmp_path / "part", progress=False, resume=True)
    assert resumed.step == 10
    resumed.fit()
    assert _losses(tmp_path / "part") == _losses(tmp_path / "full")
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    for a, b in zip(
        full.optimizer.state_dict()["state"].values(),
        resumed.optimizer.state_dict()["state"].values(),
    ):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_interrupted_save_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    trainer = Trainer(_cfg("train.steps=20"), tmp_path / "run", progress=False)
    trainer.fit(max_steps=10)
    ckpt_dir = tmp_path / "run" / "checkpoints"
    before = latest_checkpoint(ckpt_dir)

    def crash(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr("moesaic.train.checkpoint.torch.save", crash)
    with pytest.raises(
        CheckpointWriteError,
        match=r"step-000020 \(OSError: disk full \(simulated\)\);.*step-000010 is intact",
    ):
        trainer.fit()  # runs to step 20, then the save fails half-way
    monkeypatch.undo()
    assert latest_checkpoint(ckpt_dir) == before
    assert not list(ckpt_dir.glob(".tmp-*")), "the temporary directory is cleaned up"
    model = build_model(trainer.cfg, 256)
    state = load_checkpoint(before, model)
    assert state["step"] == 10


def _cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "moesaic", *args], capture_output=True, text=True, cwd=cwd
    )


@pytest.mark.parametrize(
    "override,message",
    [
        (
            "train.stepz=3",
            "unknown key 'stepz' in train; valid keys: checkpoint_activations, checkpoint_every",
        ),
        ("train.steps=many", "--set train.steps='many': expected int"),
        (
            "modle.d_model=3",
            "unknown key 'modle' in the run config; valid keys: data, distill, finetune",
        ),
    ],
)
def test_bad_set_exits_2_with_one_line_and_no_traceback(override, message):
    out = _cli("train", "--set", override)
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_help_lists_every_command():
    out = _cli("--help")
    assert out.returncode == 0
    for command in ("train", "compare", "generate", "eval", "bench"):
        assert command in out.stdout


def test_cli_train_eval_generate_round_trip(tmp_path):
    run = tmp_path / "run"
    out = _cli("train", "--recipe", "lm-moe-test", "--run-dir", str(run), "--no-progress")
    assert out.returncode == 0, out.stderr
    assert "validation loss:" in out.stdout and "parameters:" in out.stdout
    ev = _cli("eval", "--run", str(run))
    assert ev.returncode == 0 and "validation loss" in ev.stdout
    gen = [
        _cli(
            "generate",
            "--run",
            str(run),
            "--prompt",
            "def f(",
            "--max-new-tokens",
            "10",
            "--seed",
            "3",
        ).stdout
        for _ in range(2)
    ]
    assert gen[0] == gen[1] and gen[0].startswith("def f(")
    bad = _cli("generate", "--run", str(run), "--prompt", "")
    assert bad.returncode == 2 and "--prompt must not be empty" in bad.stderr


def test_compare_writes_plot_json_and_ratios(tmp_path):
    from moesaic.train.compare import run_compare

    result = run_compare(_cfg("train.steps=20"), tmp_path / "cmp", progress=False)
    s = result.summary
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())["runs"]["dense"]
    assert s["runs"]["moe"]["params_total"] > s["runs"]["dense"]["params_total"]
    assert s["step_cost_ratio"] > 0 and s["flops_per_token_ratio"] >= 1.0
    dense_evals = s["runs"]["dense"]["evals"]
    assert dense_evals[-1]["val_loss"] == s["dense_final_val_loss"]


def test_resuming_a_finished_run_says_nothing_was_trained(tmp_path):
    run = tmp_path / "run"
    Trainer(_cfg("train.steps=2", "train.sample_tokens=0"), run, progress=False).fit()
    done = _cli("train", "--run-dir", str(run), "--resume", "--no-progress")
    assert done.returncode == 0, done.stderr
    assert "training speed: no steps trained (the run had already reached step 2" in done.stdout
    assert "0 tokens/s" not in done.stdout
