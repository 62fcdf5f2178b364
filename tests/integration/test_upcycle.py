"""``moesaic upcycle``: a trained dense run becomes an MoE run equal to it at step 0 that trains
and resumes; mistakes are one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

import moesaic as ms
from moesaic.cli.main import main
from moesaic.train.checkpoint import latest_checkpoint
from moesaic.train.config import apply_overrides
from moesaic.train.recipes import get_recipe
from moesaic.train.run import load_run
from moesaic.train.trainer import Trainer


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    cfg = apply_overrides(
        get_recipe("lm-moe-test"), ["model.moe=none", "train.steps=6", "train.eval_every=6"]
    )
    run_dir = tmp_path_factory.mktemp("upcycle") / "dense"
    Trainer(cfg, run_dir, progress=False).fit()
    return run_dir


def test_upcycled_run_starts_equal_to_the_dense_model_trains_and_resumes(dense_run, capsys):
    out = dense_run.parent / "moe"
    argv = ["upcycle", "--run", str(dense_run), "--out", str(out), "--experts", "3"]
    assert main([*argv, "--set", "train.steps=4", "--no-progress"]) == 0
    record = json.loads((out / "upcycled_from.json").read_text())
    assert record["dense_step"] == 6
    assert record["upcycled_val_loss_step0"] == pytest.approx(record["dense_val_loss"], abs=1e-5)
    assert "validation loss at step 0" in capsys.readouterr().out
    # the step-0 checkpoint holds copies of the dense FFN in every expert
    dense = load_run(dense_run).model
    step0 = torch.load(out / "checkpoints" / "step-000000" / "state.pt", weights_only=True)
    assert step0["step"] == 0
    moe = load_run(out)
    assert moe.step == 4 and moe.cfg.model.moe == ms.MoEConfig(
        num_experts=3, router="topk", top_k=2
    )
    assert latest_checkpoint(out / "checkpoints").name == "step-000004"
    layer = moe.model.blocks[1].ffn
    assert layer.experts.w1.shape == (3, 32, 64)
    assert not torch.equal(layer.experts.w1[0], dense.blocks[1].ffn.w1.weight.t())  # trained
    # and it continues like any run
    assert (
        main(
            ["train", "--resume", "--run-dir", str(out), "--set", "train.steps=6", "--no-progress"]
        )
        == 0
    )
    assert load_run(out).step == 6
    # upcycling it again is a one-line error naming the field
    assert main(["upcycle", "--run", str(out), "--out", str(out.parent / "again")]) == 2
    assert "model.moe.num_experts=3: the model is already an MoE" in capsys.readouterr().err


def test_bad_upcycle_arguments_are_one_line_errors(dense_run, tmp_path, capsys):
    assert main(["upcycle", "--run", str(tmp_path / "nope"), "--out", str(tmp_path / "y")]) == 2
    assert "is not a run directory" in capsys.readouterr().err
    base = ["upcycle", "--run", str(dense_run), "--out", str(tmp_path / "z")]
    assert main([*base, "--experts", "0"]) == 2
    assert "model.moe.num_experts=0 must be >= 1" in capsys.readouterr().err
    assert main([*base, "--router", "nope"]) == 2
    assert "model.moe.router='nope' is not one of" in capsys.readouterr().err
    assert not (tmp_path / "z").exists()


def test_upcycle_benchmark_runs_in_quick_mode(tmp_path, capsys):
    from benchmarks.upcycle import main as bench

    argv = ["--recipe", "lm-moe-test", "--set", "model.moe=none", "--dense-steps", "2"]
    assert bench([*argv, "--steps", "2", "--eval-every", "2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| step | upcycle | scratch | dense-continued |" in out and "| 2 | " in out
    summary = json.loads((tmp_path / "upcycle_bench.json").read_text())
    evals = {name: dict(run["evals"]) for name, run in summary["runs"].items()}
    # step 0 of the upcycled run is the dense model's loss (top-2 renormalised router)
    assert evals["upcycle"][0] == pytest.approx(evals["dense"][2], abs=1e-5)
