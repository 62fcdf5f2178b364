"""Auxiliary-loss-free load balancing (DeepSeek-V3 section 2.1.2; Wang et al. 2024): a per-expert
bias chooses the experts and never weights them; ``ms.update_balance_biases`` moves it by a sign
step toward balance; it is checkpointed, and training with it resumes bit for bit."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

import moesaic as ms
from moesaic.models.lm import LMConfig, MoELM
from moesaic.routing.stats import RoutingStats
from moesaic.train.config import apply_overrides
from moesaic.train.recipes import get_recipe
from moesaic.train.trainer import Trainer
from tests.unit.routing._util import route

BALANCED = {"score_func": "sigmoid", "balance_rate": 0.01}


def _router(E=8, k=2, **options):
    return ms.ROUTERS["topk"](16, E, k, **{**BALANCED, **options})


def test_the_update_is_a_sign_step_toward_the_mean_load_and_clears_the_counts():
    router = _router(E=4, balance_rate=0.5)
    router.balance_counts.copy_(torch.tensor([3, 1, 2, 2]))
    assert ms.update_balance_biases(router) is True
    torch.testing.assert_close(router.balance_bias, torch.tensor([-0.5, 0.5, 0.0, 0.0]))
    assert int(router.balance_counts.abs().sum()) == 0
    ms.update_balance_biases(router)  # nothing counted since: no change
    torch.testing.assert_close(router.balance_bias, torch.tensor([-0.5, 0.5, 0.0, 0.0]))


def test_only_training_forwards_count_and_every_assignment_counts():
    router = _router()
    x = torch.randn(30, 16)
    r1 = route(router, x)
    r2 = route(router, x[:7])
    want = torch.bincount(torch.cat([r1.expert, r2.expert]), minlength=8)
    assert torch.equal(router.balance_counts, want) and int(want.sum()) == 2 * 37
    route(router.eval(), x)
    with torch.no_grad():
        route(router.train(), x[:0])
    assert torch.equal(router.balance_counts, want)


def test_a_model_without_balancing_routers_is_a_no_op():
    layer = ms.MoE(16, 32, 4, router="topk")
    assert ms.update_balance_biases(layer) is False
    assert ms.update_balance_biases(torch.nn.Linear(2, 2)) is False


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_the_bias_chooses_experts_but_never_reaches_the_combine_weights(score_func):
    router = _router(score_func=score_func)
    torch.nn.init.normal_(router.gate.weight)
    x = torch.randn(40, 16)
    before = route(router, x)
    with torch.no_grad():  # a bias large enough to change every token's choice
        router.balance_bias.copy_(torch.tensor([5.0, 5.0, 0, 0, 0, 0, 0, 0]))
    router.balance_bias.requires_grad_(True)  # a leaf: any path from it would fill its .grad
    r = route(router, x)
    assert not torch.equal(r.expert, before.expert)
    assert set(r.expert.tolist()) == {0, 1}
    logits = router.logits(x)
    scores = logits.softmax(-1) if score_func == "softmax" else logits.sigmoid()
    expert_TK = r.expert.view(2, 40).t()
    chosen = scores.gather(1, expert_TK)
    torch.testing.assert_close(r.weight.view(2, 40).t(), chosen / chosen.sum(-1, keepdim=True))
    x.requires_grad_(True)
    layer_out = (route(router, x).weight * torch.randn(80)).sum()
    layer_out.backward()
    assert router.balance_bias.grad is None
    assert x.grad is not None and router.gate.weight.grad is not None


def test_the_bias_reaches_no_gradient_of_a_whole_layer():
    layer = ms.MoE(16, 32, 8, router="topk", top_k=2, aux_loss_weight=0.0, router_options=BALANCED)
    with torch.no_grad():
        layer.router.balance_bias.copy_(torch.linspace(-1, 1, 8))
    layer.router.balance_bias.requires_grad_(True)
    y = layer(torch.randn(4, 10, 16))
    (y.square().mean() + ms.aux_loss(layer)).backward()
    assert layer.router.balance_bias.grad is None
    assert layer.router.gate.weight.grad.abs().sum() > 0


def _load_cv(router, x) -> float:
    r = route(router, x)
    requested = torch.bincount(r.expert, minlength=router.num_experts)
    return RoutingStats(requested, requested, r.probs_TE).load_cv


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_the_load_cv_falls_over_updates_without_any_aux_loss_or_gradient(score_func):
    """A fixed input whose mean direction favours a few experts; only the bias moves."""
    torch.manual_seed(0)
    router = _router(E=8, k=2, score_func=score_func, balance_rate=0.01)
    torch.nn.init.normal_(router.gate.weight, std=0.3)
    x = torch.randn(512, 16) + 0.5  # every token shares a direction: a skewed load
    cvs = []
    for _ in range(50):
        cvs.append(_load_cv(router, x))  # training forward: counts
        ms.update_balance_biases(router)
    cvs.append(_load_cv(router.eval(), x))
    assert cvs[0] > 0.5, cvs[0]  # skewed at the start (measured: 0.64)
    # measured: 0.13 (softmax) and 0.05 (sigmoid) after 50 updates, oscillating in a band
    assert cvs[-1] < 0.3 * cvs[0], cvs
    assert max(cvs[-10:]) < 0.35 * cvs[0], cvs
    assert router.balance_bias.abs().max() <= 50 * 0.01 + 1e-6


def test_the_bias_is_checkpointed_and_the_counts_are_not():
    cfg = LMConfig(
        d_model=32,
        n_heads=2,
        n_layers=2,
        d_ff=64,
        max_seq_len=16,
        moe=ms.MoEConfig(num_experts=4, router="topk", top_k=2, router_options=BALANCED),
    )
    model = MoELM(cfg)
    router = model.blocks[1].ffn.router
    model(torch.randint(0, 256, (2, 16)))
    ms.update_balance_biases(model)
    model(torch.randint(0, 256, (2, 16)))  # counts pending: never saved
    state = model.state_dict()
    assert "blocks.1.ffn.router.balance_bias" in state
    assert not any("balance_counts" in k for k in state)
    assert router.balance_bias.abs().sum() > 0
    fresh = MoELM(cfg)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.blocks[1].ffn.router.balance_bias, router.balance_bias)
    assert int(fresh.blocks[1].ffn.router.balance_counts.sum()) == 0
    idx = torch.randint(0, 256, (2, 16))
    torch.testing.assert_close(fresh.eval()(idx), model.eval()(idx))


# -- the trainer ------------------------------------------------------------------------------

SETTINGS = [
    "model.moe.router=topk",
    "model.moe.top_k=2",
    "model.moe.aux_loss_weight=0",
    "model.moe.router_options.score_func=sigmoid",
    "model.moe.router_options.balance_rate=0.01",
    "train.steps=8",
    "train.eval_every=4",
    "train.checkpoint_every=3",
    "train.log_every=1",
    "train.threads=1",
    "train.sample_tokens=0",
]


def _trainer(run_dir, resume=False):
    cfg = apply_overrides(get_recipe("lm-moe-test"), SETTINGS)
    return Trainer(cfg, run_dir, progress=False, resume=resume)


def _bias(trainer) -> torch.Tensor:
    return trainer.model.blocks[1].ffn.router.balance_bias


def _same_state(a: Trainer, b: Trainer) -> None:
    for (name, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(x, y), name


def test_the_trainer_updates_the_bias_every_step_and_resumes_bit_identically(tmp_path):
    full = _trainer(tmp_path / "full")
    full.fit()
    bias = _bias(full)
    # 8 sign steps of 0.01: every entry a multiple of 0.01 within 0.08, and the load moved it
    assert bias.abs().max() <= 0.08 + 1e-6 and bias.abs().sum() > 0
    assert int(full.model.blocks[1].ffn.router.balance_counts.sum()) == 0
    part = _trainer(tmp_path / "part")
    part.fit(max_steps=5)  # checkpointed at 3 and 5
    resumed = _trainer(tmp_path / "part", resume=True)
    assert resumed.step == 5
    resumed.fit()
    _same_state(full, resumed)
    rows = [
        json.loads(line) for line in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
    ]
    want = [
        json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r.get("loss") for r in rows] == [r.get("loss") for r in want]


@pytest.fixture
def poison_update():
    """``poison_update(trainer, step)``: the update at ``step`` writes an inf into one weight."""
    handles = []

    def arm(trainer, bad_step):
        def hook(optimizer, args, kwargs):
            if trainer.step + 1 == bad_step and optimizer is trainer.optimizer:
                with torch.no_grad():
                    trainer.model.blocks[0].attn.qkv.weight[0, 0] = math.inf

        handles.append(register_optimizer_step_post_hook(hook))

    yield arm
    for handle in handles:
        handle.remove()


def test_a_rolled_back_or_skipped_step_moves_no_bias(tmp_path, poison_update):
    """The bad update's loads are forgotten: a rollback to the step-3 checkpoint that replays
    without step 5 ends where a run whose guard skipped step 5 ends, biases included."""
    rolled = _trainer(tmp_path / "rolled")
    poison_update(rolled, 5)
    rolled.fit()
    skipped = _trainer(tmp_path / "skipped")
    real = skipped.model.loss
    skipped.model.loss = lambda x, y: (
        real(x, y) * (math.nan if skipped.step + 1 == 5 and skipped.model.training else 1.0)
    )
    skipped.fit(max_steps=4)
    before = _bias(skipped).clone()
    skipped.fit(max_steps=1)  # step 5: skipped, its counts forgotten
    assert skipped.guard.skipped == 1 and torch.equal(_bias(skipped), before)
    assert int(skipped.model.blocks[1].ffn.router.balance_counts.sum()) == 0
    skipped.fit()
    assert rolled.guard.bad_updates == {5}
    _same_state(rolled, skipped)
    assert _bias(rolled).abs().max() <= 0.07 + 1e-6  # 7 updates: step 5 moved nothing
