"""DeepSeekMoE's layout in ``LMConfig`` (Dai et al. 2024): fine-grained experts narrower than the
dense FFN (``expert_d_ff``), shared experts (``moe.shared_d_ff``), dense first layers
(``first_dense_layers``), and everything that reads a layer's widths: the dense equivalent, the
FLOPs formula, the memory bound, Mixtral export and upcycling."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import moesaic as ms
from moesaic.convert.lm import upcycled_lm_config
from moesaic.convert.mixtral import export_mixtral
from moesaic.metrics import count, lm_flops_per_token
from moesaic.models.lm import DenseFFN, LMConfig, MoELM
from moesaic.models.registry import create, model_config
from moesaic.train.config import apply_overrides
from moesaic.train.recipes import dense_baseline, get_recipe
from moesaic.train.resources import estimate_needs

MOE = ms.MoEConfig(num_experts=8, router="topk", top_k=3, shared_d_ff=16)


def _cfg(**fields) -> LMConfig:
    base = dict(d_model=32, n_heads=2, n_layers=4, d_ff=64, max_seq_len=32, moe=MOE)
    return LMConfig(**{**base, **fields})


def test_experts_take_expert_d_ff_and_dense_layers_d_ff():
    model = MoELM(_cfg(expert_d_ff=16, moe_every=1, first_dense_layers=1))
    kinds = [type(b.ffn).__name__ for b in model.blocks]
    assert kinds == ["DenseFFN", "MoE", "MoE", "MoE"]
    assert model.blocks[0].ffn.w1.out_features == 64
    for block in model.blocks[1:]:
        assert block.ffn.experts.d_ff == 16 and block.ffn.shared.d_ff == 16
        assert block.ffn.config.d_ff == 16


@pytest.mark.parametrize(
    ("fields", "moe_layers"),
    [
        ({"moe_every": 1, "first_dense_layers": 0}, [0, 1, 2, 3]),
        ({"moe_every": 1, "first_dense_layers": 3}, [3]),
        ({"moe_every": 2, "first_dense_layers": 2}, [3]),
        ({"moe_every": 2, "first_dense_layers": 1}, [1, 3]),
    ],
)
def test_first_dense_layers_keep_the_first_layers_dense(fields, moe_layers):
    cfg = _cfg(**fields)
    assert [i for i in range(4) if cfg.moe_layer(i)] == moe_layers
    model = MoELM(cfg)
    assert [i for i, b in enumerate(model.blocks) if isinstance(b.ffn, ms.MoE)] == moe_layers


def test_the_dense_equivalent_matches_routed_plus_shared_width_at_the_moe_layers():
    cfg = _cfg(expert_d_ff=16, moe_every=1, first_dense_layers=1)
    dense = cfg.dense_equivalent()
    assert dense.moe is None and dense.expert_d_ff is None
    assert dense.matched_d_ff == 3 * 16 + 16  # k routed experts and the shared one
    assert [dense.ffn_width(i) for i in range(4)] == [64, 64, 64, 64]
    model = MoELM(dense)
    assert all(isinstance(b.ffn, DenseFFN) for b in model.blocks)
    f_moe, f_dense = lm_flops_per_token(cfg, 16), lm_flops_per_token(dense, 16)
    router = 2 * 32 * 8 * 3  # three MoE layers
    assert f_moe.forward - f_dense.forward == router


@pytest.mark.parametrize("name", ["lm-deepseekmoe-tiny", "lm-moe-tiny", "lm-mixtral-tiny"])
def test_the_flops_formula_agrees_with_the_counter_with_shared_and_fine_grained_experts(name):
    model = create(name)
    for seq_len in (64, model.cfg.max_seq_len):
        c = count(model, seq_len=seq_len)
        expected = lm_flops_per_token(model.cfg, seq_len)
        assert (c.forward_flops, c.train_flops) == (expected.forward, expected.train)


@pytest.mark.parametrize(
    "fields",
    [
        {"expert_d_ff": 16, "moe_every": 1, "first_dense_layers": 1},
        {"expert_d_ff": 16, "moe_every": 2, "first_dense_layers": 3, "n_layers": 7},
        {"moe_every": 3, "first_dense_layers": 2, "n_layers": 9},
        {"moe_every": 1, "first_dense_layers": 1, "n_layers": 2},
    ],
)
def test_the_memory_bound_counts_the_parameters_of_every_layout_exactly(fields):
    cfg = apply_overrides(get_recipe("lm-moe-test"), [])
    cfg = dataclasses.replace(cfg, model=_cfg(vocab_size=256, **fields))
    want = sum(p.numel() for p in MoELM(cfg.model).parameters())
    assert estimate_needs(cfg).parameters == want
    dense = dataclasses.replace(cfg, model=cfg.model.dense_equivalent())
    assert estimate_needs(dense).parameters == sum(
        p.numel() for p in MoELM(dense.model).parameters()
    )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"expert_d_ff": 0}, "model.expert_d_ff=0 must be >= 1"),
        ({"expert_d_ff": 16, "moe": None}, "model.expert_d_ff is for MoE models"),
        ({"first_dense_layers": -1}, "model.first_dense_layers=-1 must be an int >= 0"),
        ({"first_dense_layers": 4}, "model.first_dense_layers=4 must be < model.n_layers=4"),
        (
            {"expert_d_ff": 16, "moe": dataclasses.replace(MOE, d_ff=32)},
            "model.moe.d_ff=32 conflicts with model.expert_d_ff=16",
        ),
    ],
)
def test_bad_layouts_fail_naming_the_field(fields, message):
    with pytest.raises((TypeError, ValueError), match=message):
        _cfg(**fields)


def test_mixtral_export_names_the_deepseekmoe_fields(tmp_path):
    base = model_config("lm-mixtral-tiny")
    model = MoELM(dataclasses.replace(base, expert_d_ff=32, first_dense_layers=1))
    with pytest.raises(ValueError) as err:
        export_mixtral(model, tmp_path)
    assert "model.expert_d_ff=32" in str(err.value)
    assert "model.first_dense_layers=1" in str(err.value)


def test_upcycling_refuses_fine_grained_experts_and_dense_first_layers():
    dense = _cfg(moe=None)
    with pytest.raises(ValueError, match="upcycling copies every moe_every-th FFN whole"):
        upcycled_lm_config(dense, first_dense_layers=1)
    with pytest.raises(ValueError, match="upcycling copies every moe_every-th FFN whole"):
        upcycled_lm_config(dense, expert_d_ff=16)


def test_the_deepseekmoe_recipe_activates_the_dense_ffn_width_and_balances_by_bias():
    cfg = get_recipe("lm-deepseekmoe-tiny")
    m = cfg.model
    assert m.moe_layer(1) and not m.moe_layer(0)
    assert m.moe.experts_per_token * m.expert_width + m.moe.shared_d_ff == m.d_ff
    assert dense_baseline(cfg).model.matched_d_ff == m.d_ff
    model = MoELM(m)
    router = model.blocks[1].ffn.router
    assert router.score_func == "sigmoid" and router.balance_rate == 1e-3
    assert model.blocks[1].ffn.aux_loss_weight == 0.0
    idx = torch.randint(0, 256, (2, 32))
    model.loss(idx, idx).backward()
    assert ms.update_balance_biases(model) and router.balance_bias.abs().sum() > 0


def test_router_options_are_set_one_key_at_a_time_from_the_command_line():
    cfg = apply_overrides(
        get_recipe("lm-deepseekmoe-tiny"),
        [
            "model.moe.router_options.n_groups=4",
            "model.moe.router_options.topk_groups=2",
            "model.moe.router_options.route_scale=2.5",
            "model.moe.router_options.group_score=max",
        ],
    )
    want = {
        "score_func": "sigmoid",
        "balance_rate": 1e-3,
        "n_groups": 4,
        "topk_groups": 2,
        "route_scale": 2.5,
        "group_score": "max",
    }
    assert cfg.model.moe.router_options == want
    router = MoELM(cfg.model).blocks[1].ffn.router
    assert (router.n_groups, router.topk_groups, router.route_scale) == (4, 2, 2.5)
