"""Inference capacity (V-MoE's adaptive compute): the override reaches every MoE layer and is
undone after, and the processed share counts the kept assignments."""

from __future__ import annotations

import math

import pytest
import torch

import moesaic as ms
from moesaic.inference.capacity import capacity_override, processed_fraction


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        ms.MoE(8, 16, 4, router="topk", top_k=2, capacity_factor=2.0),
        ms.MoE(8, 16, 4, router="topk", top_k=1, drop_policy="priority"),
    ).eval()


def test_override_applies_to_every_layer_and_is_restored():
    model = _model()
    with capacity_override(model, 0.5, "priority") as layers:
        assert len(layers) == 2
        assert all(m.capacity_factor == 0.5 and m.drop_policy.name == "priority" for m in layers)
    assert model[0].capacity_factor == 2.0 and model[0].drop_policy.name == "position"
    assert model[1].capacity_factor is None and model[1].drop_policy.name == "priority"


def test_processed_fraction_counts_kept_assignments():
    model = _model()
    T = 40
    x = torch.randn(T, 8)
    with torch.no_grad(), capacity_override(model, 0.25) as layers:
        model(x)
        kept = [int(m.last_stats.tokens_per_expert.sum()) for m in layers]
        # each expert holds at most ceil(0.25 * k * T / E) assignments
        for m, n in zip(layers, kept):
            assert n <= m.num_experts * math.ceil(0.25 * m.top_k * T / m.num_experts)
        expected = sum(kept) / (2 * T + 1 * T)
        assert processed_fraction(layers) == pytest.approx(expected)
    with torch.no_grad(), capacity_override(model, None) as layers:
        model(x)
        assert processed_fraction(layers) == 1.0


def test_bad_values_are_refused():
    with pytest.raises(ValueError, match="capacity_factor=0"):
        with capacity_override(_model(), 0):
            pass
    with pytest.raises(ValueError, match="drop_policy='random'"):
        with capacity_override(_model(), 1.0, "random"):
            pass
