"""Data- and expert-parallel training equals single-process training on the whole batch, and
checkpoints move between expert-parallel sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import moesaic as ms
from moesaic.train.checkpoint import latest_checkpoint, read_checkpoint
from moesaic.train.config import apply_overrides
from moesaic.train.recipes import get_recipe
from moesaic.train.run import load_run
from moesaic.train.trainer import Trainer, evaluate
from tests.distributed._launch import _free_port, run_distributed

# Deterministic routing (no jitter or noise) and no aux loss: the balance loss is a per-rank
# statistic (GShard's local groups), so only with it off are the two setups the same function.
OVERRIDES = [
    "model.moe.router=topk",
    "model.moe.top_k=2",
    "model.moe.aux_loss_weight=0",
    "train.steps=20",
    "train.eval_every=10",
    "train.checkpoint_every=10",
    "train.sample_tokens=0",
    "train.threads=1",
]


def _cfg(expert: int):
    return apply_overrides(get_recipe("lm-moe-test"), [*OVERRIDES, f"parallel.expert={expert}"])


def _train_body(rank, world, expert, run_dir):
    groups = ms.parallel.init(expert=expert)
    Trainer(_cfg(expert), Path(run_dir), progress=False, groups=groups).fit()


def _rows(run_dir: Path):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("expert", [1, 2], ids=["data-parallel", "expert-parallel"])
def test_two_processes_step_like_one_process_on_the_whole_batch(tmp_path, expert):
    single = Trainer(_cfg(1), tmp_path / "single", progress=False)
    single.fit()
    run_distributed(_train_body, 2, expert, str(tmp_path / "dist"))
    a, b = _rows(tmp_path / "single"), _rows(tmp_path / "dist")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in ("loss", "val_loss"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-6), (ra, rb)
    weights_a, _ = read_checkpoint(latest_checkpoint(tmp_path / "single" / "checkpoints"))
    weights_b, _ = read_checkpoint(latest_checkpoint(tmp_path / "dist" / "checkpoints"))
    assert weights_a.keys() == weights_b.keys()
    for name in weights_a:
        torch.testing.assert_close(weights_b[name], weights_a[name], atol=2e-5, rtol=1e-4, msg=name)


def _eval_body(rank, world, expert, run_dir, out):
    groups = ms.parallel.init(expert=expert)
    trainer = Trainer(_cfg(expert), Path(run_dir), progress=False, groups=groups, resume=True)
    assert trainer.model.blocks[1].ffn.experts.w1.shape[0] == 4 // expert
    loss = evaluate(trainer.model, trainer.val_batches)
    if rank == 0:
        Path(out).write_text(json.dumps({"loss": loss, "step": trainer.step}))


def test_a_checkpoint_saved_with_expert_parallel_2_loads_with_sizes_1_and_4(tmp_path):
    run = tmp_path / "ep2"
    run_distributed(_train_body, 2, 2, str(run))
    saved = [r["val_loss"] for r in _rows(run) if "val_loss" in r][-1]
    one = load_run(run)  # single process, all experts
    trainer = Trainer(_cfg(1), run, progress=False, resume=True)
    trainer.close()  # the run directory's lock: the ranks below open the run too
    assert one.model.blocks[1].ffn.experts.w1.shape[0] == 4
    assert evaluate(one.model, trainer.val_batches) == pytest.approx(saved, rel=1e-5)
    run_distributed(_eval_body, 4, 4, str(run), str(tmp_path / "ep4.json"))
    four = json.loads((tmp_path / "ep4.json").read_text())
    assert four["step"] == 20
    assert four["loss"] == pytest.approx(saved, rel=1e-5)


def test_torchrun_trains_with_expert_parallelism(tmp_path):
    import subprocess
    import sys

    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(_free_port()),
            "-m",
            "moesaic",
            "train",
            "--recipe",
            "lm-moe-test",
            "--set",
            "parallel.expert=2",
            "--set",
            "train.steps=10",
            "--run-dir",
            str(tmp_path / "run"),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "2 processes, expert-parallel size 2" in out.stdout
    assert out.stdout.count("validation loss:") == 1  # only rank 0 reports
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step-000010"


# An image run with deterministic routing, no aux loss and no capacity (both are per-rank
# statistics): two data-parallel processes see the halves of each augmented global batch.
IMAGE_OVERRIDES = [
    "vision.vit.moe.router=topk",
    "vision.vit.moe.aux_loss_weight=0",
    "vision.vit.moe.capacity_factor=none",
    "vision.augment=crop+flip",
    "data.batch_size=16",
    "data.eval_batches=2",
    "train.steps=8",
    "train.eval_every=4",
    "train.checkpoint_every=4",
    "train.threads=1",
]


def _image_body(rank, world, run_dir):
    groups = ms.parallel.init(expert=1)
    cfg = apply_overrides(get_recipe("vmoe-digits"), IMAGE_OVERRIDES)
    Trainer(cfg, Path(run_dir), progress=False, groups=groups).fit()


def test_two_data_parallel_processes_train_an_image_run_like_one(tmp_path):
    cfg = apply_overrides(get_recipe("vmoe-digits"), IMAGE_OVERRIDES)
    Trainer(cfg, tmp_path / "single", progress=False).fit()
    run_distributed(_image_body, 2, str(tmp_path / "dist"))
    a, b = _rows(tmp_path / "single"), _rows(tmp_path / "dist")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in ("loss", "val_loss", "val_acc"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-6), (ra, rb)
