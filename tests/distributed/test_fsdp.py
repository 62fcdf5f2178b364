"""FSDP2 with expert parallelism on a 2-D device mesh trains like one process, and its sharded
DCP checkpoints resume on other layouts (fewer ranks, another expert-parallel size, one
process) with the same losses."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import moesaic as ms
from moesaic.train.checkpoint import ShardedWeights, latest_checkpoint, read_checkpoint
from moesaic.train.config import apply_overrides
from moesaic.train.recipes import get_recipe
from moesaic.train.trainer import Trainer
from tests.cases import metric_rows
from tests.distributed._launch import run_distributed
from tests.distributed.test_training import OVERRIDES as SAME_FUNCTION

# test_training.py's run: deterministic routing and no aux loss (a per-rank statistic), so the
# sharded and the single-process runs compute the same function; clipping is exercised too: the
# sharded norm must equal the single-process one.
OVERRIDES = [*SAME_FUNCTION, "optim.grad_clip=0.5"]


def _cfg(expert: int, shard: int):
    return apply_overrides(
        get_recipe("lm-moe-test"),
        [*OVERRIDES, f"parallel.expert={expert}", f"parallel.shard={shard}"],
    )


def _train_body(rank, world, expert, shard, run_dir, resume):
    from torch.distributed.fsdp import FSDPModule

    groups = ms.parallel.init(expert=expert, shard=shard)
    trainer = Trainer(
        _cfg(expert, shard), Path(run_dir), progress=False, groups=groups, resume=resume
    )
    model = trainer.model
    moe = model.blocks[1].ffn
    assert moe.experts.w1.shape[0] == 4 // expert  # this rank's experts (a DTensor's shape)
    assert isinstance(model, FSDPModule) == bool(shard)
    assert all(isinstance(b, FSDPModule) == bool(shard) for b in model.blocks)
    assert isinstance(moe.experts, FSDPModule) == (shard and 1 < expert < world)
    trainer.fit()
    trainer.close()


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metric_rows(run_dir) if "loss" in r}


def _val(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in metric_rows(run_dir) if "val_loss" in r}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process on the whole batch, and 4 processes with EP=2 x shard=2 on its quarters."""
    root = tmp_path_factory.mktemp("fsdp")
    single = Trainer(_cfg(1, 0), root / "single", progress=False)
    single.fit()
    single.close()
    run_distributed(_train_body, 4, 2, 2, str(root / "ep2-shard2"), False)
    return root


def test_ep2_x_shard2_on_4_processes_equals_one_process(runs):
    single, sharded = runs / "single", runs / "ep2-shard2"
    a, b = _losses(single), _losses(sharded)
    assert sorted(a) == sorted(b) and max(a) == 20
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5), step
    assert _val(sharded) == pytest.approx(_val(single), rel=1e-5)
    norms_a = [r["grad_norm"] for r in metric_rows(single) if "grad_norm" in r]
    norms_b = [r["grad_norm"] for r in metric_rows(sharded) if "grad_norm" in r]
    assert norms_b == pytest.approx(norms_a, rel=1e-4)
    assert max(norms_a) > 0.5  # the clipping above did act
    # the sharded checkpoint reads back as the single-process weights
    weights_a, _ = read_checkpoint(latest_checkpoint(single / "checkpoints"))
    weights_b, _ = read_checkpoint(latest_checkpoint(sharded / "checkpoints"))
    assert isinstance(weights_b, ShardedWeights)
    assert not isinstance(weights_a, ShardedWeights)
    assert set(weights_b) == set(weights_a)
    for name in weights_a:
        torch.testing.assert_close(weights_b[name], weights_a[name], atol=2e-5, rtol=1e-4)


def _resume_copy(runs: Path, name: str) -> Path:
    """A copy of the sharded run whose newest checkpoint is step 10's."""
    run = runs / name
    shutil.copytree(runs / "ep2-shard2", run)
    shutil.rmtree(run / "checkpoints" / "step-000020")
    return run


@pytest.mark.parametrize(
    "world,expert,shard",
    [(2, 1, 2), (4, 4, 1), (2, 2, 0), (1, 1, 0)],
    ids=["2-processes-fsdp2-no-ep", "4-processes-ep4-hsdp", "2-processes-plain-ep2", "one-process"],
)
def test_a_dcp_checkpoint_of_4_ranks_resumes_on_another_layout(runs, world, expert, shard):
    run = _resume_copy(runs, f"resume-{world}-{expert}-{shard}")
    if world == 1:
        trainer = Trainer(_cfg(1, 0), run, progress=False, resume=True)
        assert trainer.step == 10
        trainer.fit()
        trainer.close()
    else:
        run_distributed(_train_body, world, expert, shard, str(run), True)
    full, resumed = _losses(runs / "ep2-shard2"), _losses(run)
    assert sorted(resumed) == sorted(full)
    later = [step for step in full if step > 10]
    assert later
    for step in later:
        assert resumed[step] == pytest.approx(full[step], rel=1e-5), step
    assert _val(run) == pytest.approx(_val(runs / "ep2-shard2"), rel=1e-5)
    state = json.loads((run / "checkpoints" / "step-000020" / "manifest.json").read_text())
    assert ("format" in state) == (shard > 0)  # a plain run writes safetensors again
