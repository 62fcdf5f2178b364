"""``moesaic sweep``: each point equals a single ``moesaic compare`` of the same configuration,
an interrupted sweep resumes without training its finished points again and ends where an
uninterrupted one does, and bad sizes, budgets and directories fail in one line."""

from __future__ import annotations

import json

import pytest

import moesaic.train.compare as compare_module
from moesaic.train.compare import run_compare
from moesaic.train.config import apply_overrides
from moesaic.train.recipes import get_recipe
from moesaic.train.sweep import parse_size, point_config, run_sweep

SIZES = {"16x2": parse_size("16x2"), "24x2": parse_size("24x2")}
BUDGETS = [4, 8]


class Interrupted(Exception):
    """Stands for a signal or a crash between two checkpoints."""


def _base():
    # the sweep recipe, shrunk to seconds, on the standard library with one package held out
    return apply_overrides(
        get_recipe("lm-sweep"),
        [
            "data.corpus=stdlib",
            "data.holdout_domain=email",
            "data.batch_size=4",
            "data.seq_len=32",
            "data.eval_batches=2",
            "train.threads=1",
        ],
    )


def _losses(summary):
    """Every loss a compare summary holds (timings left out: they differ run to run)."""
    return {
        name: (
            [e["val_loss"] for e in run["evals"]],
            run["final_val_loss"],
            run["heldout_loss"],
        )
        for name, run in summary["runs"].items()
    }


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    return out, run_sweep(_base(), out, SIZES, BUDGETS, progress=False)


def test_every_point_equals_a_single_compare_run(swept, tmp_path):
    out, result = swept
    assert [(r["size"], r["steps"]) for r in result["points"]] == [
        ("16x2", 4), ("16x2", 8), ("24x2", 4), ("24x2", 8),
    ]  # fmt: skip
    assert json.loads((out / "sweep.json").read_text()) == result
    assert (out / "sweep.png").stat().st_size > 0
    single = run_compare(point_config(_base(), SIZES["24x2"], 8), tmp_path / "b", progress=False)
    point = json.loads((out / "24x2-8" / "compare.json").read_text())
    assert _losses(point) == _losses(single.summary)
    row = result["points"][3]
    assert row["val_loss"]["moe"] == single.summary["moe_final_val_loss"]
    assert row["heldout_loss"]["dense"] == single.summary["runs"]["dense"]["heldout_loss"]
    assert row["flops_speedup"] == single.summary["flops_speedup"]


def test_the_speedup_is_dense_flops_over_the_moe_flops_to_the_dense_loss(swept):
    out, result = swept
    for row in result["points"]:
        s = json.loads((out / f"{row['size']}-{row['steps']}" / "compare.json").read_text())
        moe, dense = s["runs"]["moe"], s["runs"]["dense"]
        # the dense model's own curve reaches its final loss exactly at its last step
        assert dense["train_flops"] == pytest.approx(
            row["steps"] * dense["tokens_per_step"] * dense["train_flops_per_token"]
        )
        # by hand: the first evaluation at or below the target, interpolated from the one before
        target, evals = dense["final_val_loss"], moe["evals"]
        hit = next((i for i, e in enumerate(evals) if e["val_loss"] <= target), None)
        if hit is None:
            assert row["flops_speedup"] is None
            continue
        step = evals[hit]["step"]
        if hit > 0:
            a, b = evals[hit - 1], evals[hit]
            step = a["step"] + (a["val_loss"] - target) / (a["val_loss"] - b["val_loss"]) * (
                b["step"] - a["step"]
            )
        moe_flops = step * moe["tokens_per_step"] * moe["train_flops_per_token"]
        assert row["flops_speedup"] == pytest.approx(dense["train_flops"] / moe_flops)


def test_an_interrupted_sweep_resumes_without_rerunning_finished_points(
    swept, tmp_path, monkeypatch
):
    out = tmp_path / "sweep"
    fit, calls, stopped = compare_module.Trainer.fit, [], []

    def interrupted(self, max_steps=None):
        calls.append((self.run_dir.relative_to(out).as_posix(), self.step))
        # the third run (16x2-8's MoE) stops, checkpointed, after 3 of its 8 steps
        if len(calls) == 3 and not stopped:
            fit(self, max_steps=3)
            stopped.append(self.step)
            raise Interrupted
        return fit(self, max_steps)

    monkeypatch.setattr(compare_module.Trainer, "fit", interrupted)
    with pytest.raises(Interrupted):
        run_sweep(_base(), out, SIZES, BUDGETS, progress=False)
    finished = (out / "16x2-4" / "compare.json").stat().st_mtime_ns
    calls.clear()
    result = run_sweep(_base(), out, SIZES, BUDGETS, progress=False)
    # 16x2-4 is reused untouched; 16x2-8's MoE continues from its step-3 checkpoint (resume fits
    # the newest one: checkpoints every quarter, so step 2), then the rest train from scratch
    assert (out / "16x2-4" / "compare.json").stat().st_mtime_ns == finished
    assert calls[0][0] == "16x2-8/moe" and calls[0][1] > 0
    assert [c[0] for c in calls] == ["16x2-8/moe", "16x2-8/dense", "24x2-4/moe",
                                     "24x2-4/dense", "24x2-8/moe", "24x2-8/dense"]  # fmt: skip
    assert all(step == 0 for _, step in calls[1:])
    uninterrupted = swept[1]
    for row, ref in zip(result["points"], uninterrupted["points"]):
        assert (row["val_loss"], row["heldout_loss"]) == (ref["val_loss"], ref["heldout_loss"])


def test_bad_sizes_budgets_and_directories_fail_in_one_line(swept, cli, tmp_path):
    out, _ = swept
    cases = [
        (["--sizes", "huge"], "--sizes: 'huge' is not one of"),
        (["--sizes", "16x1"], "size '16x1' has no MoE layer"),
        (["--sizes", "xs,xs"], "repeats a size"),
        (["--budgets", "0"], "--budgets=[0] must be step counts >= 1"),
        (["--budgets", "ten"], "--budgets='ten' must be comma-separated step counts"),
        (["--recipe", "lstm-moe-test"], "recipe 'lstm-moe-test' has a lstm section"),
        (["--set", "data.holdout_domain=nope"], "data.holdout_domain='nope' is not one of"),
    ]
    for args, message in cases:
        code, _, stderr = cli("sweep", "--out", str(tmp_path / "x"), "--no-progress", *args)
        assert code == 2 and message in stderr and stderr.count("\n") == 1, stderr
    # a directory holding another configuration's runs (here: another learning rate)
    code, _, stderr = cli(
        "sweep", "--out", str(out), "--sizes", "16x2", "--budgets", "4", "--no-progress",
        "--set", "data.corpus=stdlib", "--set", "data.holdout_domain=email",
        "--set", "data.batch_size=4", "--set", "data.seq_len=32", "--set", "data.eval_batches=2",
        "--set", "optim.lr=0.01",
    )  # fmt: skip
    assert code == 2 and "holds a run of another configuration" in stderr, stderr
