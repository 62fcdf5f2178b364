"""``ms.MoEConfig``: one typed, validated description of a layer; ``ms.MoE(config)`` and
``ms.MoE(**fields)`` build the same layer."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import moesaic as ms
from tests.unit.test_validation import BAD_CONSTRUCTOR_ARGS

FIELDS = {"d_model": 8, "d_ff": 16, "num_experts": 4}


@pytest.mark.parametrize(
    "kwargs,error,match", BAD_CONSTRUCTOR_ARGS, ids=[str(a[0]) for a in BAD_CONSTRUCTOR_ARGS]
)
def test_the_config_rejects_what_the_layer_rejects_with_the_same_message(kwargs, error, match):
    with pytest.raises(error, match=match):
        ms.MoEConfig(**{**FIELDS, "num_experts": 8, **kwargs})


@pytest.mark.parametrize(
    "fields",
    [
        {"router": "topk", "top_k": 2, "activation": "swiglu", "shared_d_ff": 12},
        {"router": "switch", "capacity_factor": 1.0, "drop_policy": "priority", "jitter": 0.0},
        {"router": "noisy_topk", "expert_bias": True, "z_loss_weight": 0.01},
    ],
)
def test_a_layer_from_a_config_equals_the_layer_from_its_fields(fields):
    x = torch.randn(2, 5, 8)
    torch.manual_seed(0)
    by_fields = ms.MoE(**FIELDS, **fields)
    torch.manual_seed(0)
    config = ms.MoEConfig(**FIELDS, **fields)
    by_config = ms.MoE(config)
    assert by_config.config is config and by_fields.config == config
    a, b = by_fields.state_dict(), by_config.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    torch.manual_seed(1)
    ya = by_fields(x)
    torch.manual_seed(1)
    torch.testing.assert_close(by_config(x), ya, rtol=0, atol=0)
    torch.testing.assert_close(by_config.aux_loss, by_fields.aux_loss, rtol=0, atol=0)
    for name in ("d_model", "num_experts", "top_k", "capacity_factor", "aux_loss_weight"):
        assert getattr(by_config, name) == getattr(by_fields, name)


def test_positional_widths_and_runtime_keywords_still_work():
    layer = ms.MoE(8, 16, 4, router="topk", dtype=torch.float64, device="cpu")
    assert layer.config == ms.MoEConfig(**FIELDS, router="topk")
    assert layer.experts.w1.dtype == torch.float64
    assert ms.MoE(ms.MoEConfig(**FIELDS), dtype=torch.float64).experts.w1.dtype == torch.float64


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        ((ms.MoEConfig(**FIELDS),), {"top_k": 2}, r"a MoEConfig or its fields, not both.*top_k"),
        ((ms.MoEConfig(**FIELDS), 3), {}, "not both"),
        ((8, 16, 4, 2), {}, "at most 3 positional arguments"),
        ((8, 16), {"d_ff": 16, "num_experts": 4}, r"\['d_ff'\] both by position and by keyword"),
        ((ms.MoEConfig(num_experts=4),), {}, "ms.MoE needs d_model and d_ff, got d_model=None"),
    ],
)
def test_a_config_and_fields_together_are_a_type_error(args, kwargs, match):
    with pytest.raises(TypeError, match=match):
        ms.MoE(*args, **kwargs)


def test_the_config_is_frozen_and_changes_by_replace():
    cfg = ms.MoEConfig(**FIELDS, router="gshard")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.top_k = 1
    assert cfg.experts_per_token == 2 and cfg.top_k is None
    assert dataclasses.replace(cfg, router="switch").experts_per_token == 1
    assert ms.MoEConfig(**FIELDS, router_dtype="bfloat16").router_dtype == torch.bfloat16
    with pytest.raises(TypeError, match="router_dtype='fp8' must be a floating torch.dtype"):
        ms.MoEConfig(**FIELDS, router_dtype="fp8")


def test_inherit_fills_what_the_model_owns_and_names_both_values_on_a_conflict():
    cfg = ms.MoEConfig(num_experts=4)
    filled = cfg.inherit("model.", d_model=8, d_ff=16, activation="relu")
    assert (filled.d_model, filled.d_ff, filled.activation) == (8, 16, "relu")
    assert filled.inherit("model.", d_model=8) == filled
    with pytest.raises(ValueError, match="d_ff=16 conflicts with model.d_ff=32"):
        filled.inherit("model.", d_ff=32)


def test_expert_parameters_are_the_routed_experts_only_and_carry_no_marker():
    layer = ms.MoE(**FIELDS, shared_d_ff=8, activation="swiglu")
    experts = list(layer.expert_parameters())
    assert [id(p) for p in experts] == [id(p) for p in layer.experts.parameters()]
    assert len(experts) == 3  # w1, w2, w3; not the router, not the shared expert
    assert not any(hasattr(p, "moesaic_expert") for p in layer.parameters())
    model = torch.nn.Sequential(layer, torch.nn.Linear(8, 8))
    assert [id(p) for p in ms.parallel.expert_parameters(model)] == [id(p) for p in experts]
