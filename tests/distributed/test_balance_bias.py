"""Auxiliary-loss-free balancing across processes: ``ms.update_balance_biases`` sums the loads
over the group, so every rank's bias stays identical and equal to one process's on all the
tokens; a distributed run with it trains like one process on the whole batch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import moesaic as ms
from moesaic.context import RoutingContext
from moesaic.train.config import apply_overrides
from moesaic.train.recipes import get_recipe
from moesaic.train.trainer import Trainer
from tests.distributed._launch import run_distributed

OPTIONS = {"score_func": "sigmoid", "balance_rate": 0.01, "n_groups": 4, "topk_groups": 2}
STEPS, T = 6, 64


def _router() -> torch.nn.Module:
    torch.manual_seed(0)
    router = ms.ROUTERS["topk"](16, 8, 2, **OPTIONS)
    torch.nn.init.normal_(router.gate.weight, std=0.5)
    return router


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(2 * T, 16, generator=g) + 0.5 for _ in range(STEPS)]


def _rank_body(rank, world):
    ms.parallel.init()
    router = _router()
    biases = []
    for x in _batches():
        router(x[rank * T : (rank + 1) * T], RoutingContext())  # this rank's half of the tokens
        ms.update_balance_biases(router, group=dist.group.WORLD)
        biases.append(router.balance_bias.tolist())
    return biases  # plain data: a tensor would not outlive its process


def test_two_ranks_keep_equal_biases_equal_to_one_process_on_all_the_tokens():
    per_rank = [torch.tensor(b) for b in run_distributed(_rank_body, 2)]
    router = _router()
    want = []
    for x in _batches():
        router(x, RoutingContext())
        ms.update_balance_biases(router)  # group=None: this process alone
        want.append(router.balance_bias.clone())
    want = torch.stack(want)
    assert torch.equal(per_rank[0], per_rank[1])
    assert torch.equal(per_rank[0], want)
    assert want[-1].abs().sum() > 0 and not torch.equal(want[0], want[-1])


def test_without_the_group_each_rank_balances_its_own_tokens():
    per_rank = [torch.tensor(b) for b in run_distributed(_local_body, 2)]
    assert not torch.equal(per_rank[0], per_rank[1])


def _local_body(rank, world):
    ms.parallel.init()
    router = _router()
    for x in _batches():
        router(x[rank * T : (rank + 1) * T], RoutingContext())
        ms.update_balance_biases(router)
    return router.balance_bias.tolist()


OVERRIDES = [
    "model.moe.router=topk",
    "model.moe.top_k=2",
    "model.moe.aux_loss_weight=0",
    "model.moe.router_options.score_func=sigmoid",
    "model.moe.router_options.balance_rate=0.01",
    "train.steps=10",
    "train.eval_every=5",
    "train.checkpoint_every=5",
    "train.sample_tokens=0",
    "train.threads=1",
]


def _cfg(expert: int):
    return apply_overrides(get_recipe("lm-moe-test"), [*OVERRIDES, f"parallel.expert={expert}"])


def _train_body(rank, world, expert, run_dir):
    groups = ms.parallel.init(expert=expert)
    trainer = Trainer(_cfg(expert), Path(run_dir), progress=False, groups=groups)
    trainer.fit()
    return trainer.model.blocks[1].ffn.router.balance_bias.tolist()


def _rows(run_dir: Path):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("expert", [2], ids=["expert-parallel"])
def test_a_two_process_run_balances_like_one_process_on_the_whole_batch(tmp_path, expert):
    single = Trainer(_cfg(1), tmp_path / "single", progress=False)
    single.fit()
    biases = [
        torch.tensor(b) for b in run_distributed(_train_body, 2, expert, str(tmp_path / "dist"))
    ]
    want = single.model.blocks[1].ffn.router.balance_bias
    assert want.abs().sum() > 0
    assert torch.equal(biases[0], biases[1]) and torch.equal(biases[0], want)
    a, b = _rows(tmp_path / "single"), _rows(tmp_path / "dist")
    for ra, rb in zip(a, b):
        for key in ("loss", "val_loss"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-6), (ra, rb)
