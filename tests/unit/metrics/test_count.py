"""ms.metrics.count: hand-computed parameters and FLOPs, and the FlopCounterMode cross-check."""

import pytest
import torch
from torch import nn

import moesaic as ms
from moesaic.metrics import count, lm_flops_per_token, measure_flops, task_experts


class Toy(nn.Module):
    """Linear(8, 8, bias) -> swiglu MoE (E=4, F=16, switch, shared F=4) -> Linear(8, 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.moe = ms.MoE(8, 16, 4, router="switch", activation="swiglu", shared_d_ff=4)
        self.head = nn.Linear(8, 3, bias=False)

    def forward(self, x):
        return self.head(self.moe(self.proj(x)))


def test_bare_moe_counts_k_of_E_experts_and_its_gate():
    # D=8, F=16, E=4, k=2: one expert 8*16 + 16*8 = 256 params, all four 1024; gate 8*4 = 32.
    # forward per token: 2 * k * 256 = 1024 for the experts + 2 * 32 = 64 for the gate.
    c = count(ms.MoE(8, 16, 4, router="topk", top_k=2))
    assert c.total_params == 1024 + 32
    assert c.activated_params == 32 + 1024 * 2 / 4
    assert c.forward_flops == 1024 + 64
    assert c.train_flops == 3 * (1024 + 64)
    assert c.per_task == () and c.seq_len is None


def test_module_holding_an_moe_counts_its_linears_experts_shared_expert_and_gate():
    # proj 8*8 + 8 = 72 params, 2*64 = 128 FLOPs; head 24 params, 48 FLOPs.
    # swiglu expert 3 * 8*16 = 384 params (x4 = 1536), k=1: 2 * 384 = 768 FLOPs.
    # shared expert 3 * 8*4 = 96 params, 192 FLOPs; gate 32 params, 64 FLOPs.
    c = count(Toy())
    assert c.total_params == 72 + 1536 + 96 + 32 + 24
    assert c.activated_params == 72 + 384 + 96 + 32 + 24
    assert c.forward_flops == 128 + 768 + 192 + 64 + 48


def test_toy_forward_flops_equal_the_flop_counter_exactly():
    model, x = Toy().eval(), torch.randn(5, 7, 8)
    assert measure_flops(model, x) == 35 * count(model).forward_flops


def test_noisy_router_pays_for_its_noise_gate_in_training():
    layer = ms.MoE(8, 16, 4, router="noisy_topk", top_k=2)
    assert count(layer).forward_flops == 2 * 2 * 256 + 2 * (2 * 32)
    assert measure_flops(layer, torch.randn(10, 8)) == 10 * count(layer).forward_flops


def test_skill_router_activates_each_tasks_skill_set():
    skills = [[0], [1, 2], [0, 1, 2, 3]]
    layer = ms.MoE(8, 16, 4, router="skill", router_options={"task_skills": skills})
    # no gate; one expert is 256 params and 512 FLOPs per token
    per_task = [count(layer, task=t) for t in range(3)]
    assert [c.activated_params for c in per_task] == [256, 512, 1024]
    assert [c.forward_flops for c in per_task] == [512, 1024, 2048]
    mixed = count(layer)
    assert mixed.per_task == tuple(per_task)
    assert mixed.activated_params == pytest.approx((256 + 512 + 1024) / 3)


def test_task_router_counts_the_experts_its_gate_actually_picks():
    torch.manual_seed(0)
    layer = ms.MoE(8, 16, 4, router="task", top_k=2, router_options={"num_tasks": 3})
    for t in range(3):
        with ms.routing_context(task=t):
            layer(torch.randn(6, 8))
        used = layer.last_stats.tokens_per_expert.nonzero().flatten().tolist()
        assert task_experts(layer, t) == used
    # experts 1024 + gate 32 + task embedding 3*8 = 1080; per task 2 of 4 experts are idle
    c = count(layer, task=1)
    assert (c.total_params, c.activated_params) == (1080, 1080 - 512)
    assert c.forward_flops == 2 * 2 * 256  # the gate runs per task, not per token


@pytest.mark.parametrize("name", ["lm-moe-tiny", "lm-qwen2moe-tiny"])  # the latter: gated shared
def test_lm_count_agrees_with_the_analytic_lm_formula(name):
    model = ms.models.create(name)
    for seq_len in (64, model.cfg.max_seq_len):
        c = count(model, seq_len=seq_len)
        expected = lm_flops_per_token(model.cfg, seq_len)
        assert (c.forward_flops, c.train_flops) == (expected.forward, expected.train)
    assert count(model).seq_len == model.cfg.max_seq_len


TOPK2 = ms.MoEConfig(num_experts=32, top_k=2, router="topk")


@pytest.mark.parametrize(
    "overrides", [{}, {"moe": None}, {"moe": TOPK2}], ids=["switch", "dense", "topk2"]
)
def test_lm_forward_flops_match_the_flop_counter_within_5_percent(overrides):
    model = ms.models.create("lm-moe-tiny", **overrides)
    x = torch.randint(0, model.cfg.vocab_size, (2, 128))
    ratio = measure_flops(model, x) / (x.numel() * count(model, seq_len=128).forward_flops)
    assert ratio == pytest.approx(1.0, abs=0.05)


def test_lm_training_step_flops_match_the_flop_counter_within_5_percent():
    # the counter books flash attention's backward recompute, so this holds for short sequences
    model = ms.models.create("lm-moe-test")
    x = torch.randint(0, model.cfg.vocab_size, (2, 32))
    measured = measure_flops(lambda: model.loss(x, x).backward())
    ratio = measured / (x.numel() * count(model, seq_len=32).train_flops)
    assert ratio == pytest.approx(1.0, abs=0.05)


def test_count_rejects_what_it_cannot_count():
    layer = ms.MoE(8, 16, 4)
    with pytest.raises(ValueError, match="task=0 given, but the model has no 'task'"):
        count(layer, task=0)
    skill = ms.MoE(8, 16, 4, router="skill", router_options={"task_skills": [[0], [1]]})
    with pytest.raises(ValueError, match=r"task=2 must be an int in \[0, num_tasks=2\)"):
        count(skill, task=2)
    with pytest.raises(ValueError, match="seq_len=16 sets MoELM's attention FLOPs"):
        count(layer, seq_len=16)
    lm = ms.models.create("lm-moe-test")
    with pytest.raises(ValueError, match="must be <= model.max_seq_len"):
        count(lm, seq_len=lm.cfg.max_seq_len + 1)
    with pytest.raises(TypeError, match="must be an nn.Module"):
        count("model")


def test_count_is_reachable_as_ms_metrics_count():
    assert ms.metrics.count is count
