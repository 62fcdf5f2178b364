"""PR-MoE (DeepSpeed-MoE): Residual-MoE in both its forms and pyramid expert counts."""

import dataclasses

import pytest
import torch

import moesaic as ms
from moesaic.models.lm import LMConfig, MoELM
from moesaic.train.config import RunConfig, config_from_dict, config_to_dict
from moesaic.train.recipes import get_recipe


def _residual(coefficient):
    layer = ms.MoE(
        d_model=16,
        d_ff=32,
        num_experts=4,
        top_k=1,
        shared_d_ff=32,
        residual_coefficient=coefficient,
        expert_backend="torch",
    ).eval()
    with torch.no_grad():
        layer.experts.w2.zero_()  # every expert outputs 0: only the dense MLP is left
    return layer


def test_residual_moe_without_expert_output_is_the_dense_mlp():
    layer, x = _residual(False), torch.randn(7, 16)
    with torch.no_grad():  # the paper's form: y = MLP(x) + MoE_top1(x)
        torch.testing.assert_close(layer(x), layer.shared(x, [7]))


def test_residual_moe_with_the_released_coefficient_is_c1_times_the_mlp():
    layer, x = _residual(True), torch.randn(7, 16)
    with torch.no_grad():  # DeepSpeed's use_residual: y = c0 MoE(x) + c1 MLP(x), c = softmax
        c = torch.softmax(x @ layer.residual_coef.weight.t() + layer.residual_coef.bias, -1)
        torch.testing.assert_close(layer(x), c[:, 1:] * layer.shared(x, [7]))


def test_residual_coefficient_learns():
    layer = ms.MoE(d_model=8, d_ff=16, num_experts=4, shared_d_ff=16, residual_coefficient=True)
    layer(torch.randn(5, 8)).square().sum().backward()
    assert layer.residual_coef.weight.grad.abs().sum() > 0


def test_pyramid_layers_have_their_own_expert_counts_and_the_parameters_add_up():
    D, F = 32, 64
    cfg = LMConfig(
        n_layers=4,
        d_model=D,
        n_heads=2,
        d_ff=F,
        moe=ms.MoEConfig(num_experts=4),
        moe_experts=[0, 8, 0, 16],
    )
    model = MoELM(cfg)
    assert [getattr(b.ffn, "num_experts", 0) for b in model.blocks] == [0, 8, 0, 16]
    dense = MoELM(dataclasses.replace(cfg, moe=None))
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    # DeepSpeed-MoE's arithmetic: each MoE layer of E experts adds (E - 1) FFNs of 2*D*F and a
    # D x E gate over the dense model
    assert n(model) - n(dense) == (7 + 15) * 2 * D * F + D * (8 + 16)
    count = ms.metrics.count_parameters(model)
    assert count.total == n(model)


def test_pyramid_survives_the_run_config_round_trip():
    cfg = get_recipe("lm-prmoe")
    back = config_from_dict(RunConfig, config_to_dict(cfg))
    assert back.model.moe_experts == [0, 16, 0, 32] and back.model.moe.residual_coefficient


@pytest.mark.parametrize(
    "counts,message",
    [
        ([0, 8], "model.moe_experts=[0, 8] must be a list of model.n_layers=4"),
        ([0, 1, 0, 8], "model.moe_experts[1]=1 must be >= model.moe.top_k=2"),
        ([0, 0, 0, 0], "needs at least one count > 0"),
        ([0, -2, 0, 8], "model.moe_experts[1]=-2 must be an int >= 0"),
    ],
)
def test_bad_pyramids_fail_with_one_line(counts, message):
    moe = ms.MoEConfig(num_experts=8, top_k=2, router="topk")
    with pytest.raises(ValueError) as err:
        LMConfig(n_layers=4, d_model=32, n_heads=2, d_ff=64, moe=moe, moe_experts=counts)
    assert message in str(err.value)


def test_residual_coefficient_needs_a_shared_expert():
    with pytest.raises(ValueError, match="residual_coefficient=True needs shared_d_ff > 0"):
        ms.MoEConfig(num_experts=4, residual_coefficient=True)


def test_the_pyramid_can_be_set_from_the_command_line():
    from moesaic.train.config import apply_overrides

    cfg = apply_overrides(get_recipe("lm-moe-4l"), ["model.moe_experts=[0, 8, 0, 16]"])
    assert cfg.model.moe_experts == [0, 8, 0, 16]
    model = MoELM(dataclasses.replace(cfg.model, d_model=16, d_ff=32, max_seq_len=16))
    assert [getattr(b.ffn, "num_experts", 0) for b in model.blocks] == [0, 8, 0, 16]
