import pytest

from moesaic.config import MoEConfig
from moesaic.metrics.flops import lm_flops_per_token
from moesaic.models.lm import LMConfig
from moesaic.train.compare import crossing

EVALS = [
    {"step": 100, "val_loss": 3.0, "train_s": 10.0},
    {"step": 200, "val_loss": 2.0, "train_s": 20.0},
    {"step": 300, "val_loss": 1.5, "train_s": 31.0},
]


def test_crossing_interpolates_between_evaluations():
    assert crossing(EVALS, 2.5, "step") == pytest.approx(150)
    assert crossing(EVALS, 1.75, "train_s") == pytest.approx(25.5)
    assert crossing(EVALS, 3.5, "step") == 100  # reached at the first evaluation
    assert crossing(EVALS, 1.0, "step") is None


def test_dense_equivalent_has_the_moe_models_ffn_flops_plus_the_router():
    experts = MoEConfig(num_experts=8, router="topk", top_k=2)
    moe = LMConfig(moe=experts, d_ff=256, moe_every=2, n_layers=4)
    f_moe = lm_flops_per_token(moe, 128)
    f_dense = lm_flops_per_token(moe.dense_equivalent(), 128)
    router = 2 * moe.d_model * experts.num_experts * 2  # two MoE layers
    assert f_moe.forward - f_dense.forward == router
    assert f_moe.train == 3 * f_moe.forward


def test_the_dense_equivalent_of_a_shared_expert_model_matches_it_too():
    experts = MoEConfig(num_experts=8, router="topk", top_k=2, shared_d_ff=96, shared_gate=True)
    moe = LMConfig(moe=experts, d_ff=64, moe_every=1, n_layers=2, activation="swiglu")
    dense = moe.dense_equivalent()
    assert dense.matched_d_ff == 2 * 64 + 96
    f_moe, f_dense = lm_flops_per_token(moe, 128), lm_flops_per_token(dense, 128)
    router_and_gate = (2 * moe.d_model * experts.num_experts + 2 * moe.d_model) * 2  # two layers
    assert f_moe.forward - f_dense.forward == router_and_gate
