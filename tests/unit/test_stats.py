import math

import pytest
import torch

import moesaic as ms


def test_stats_of_a_hand_built_forward():
    # E=4 switch router forced onto experts by one-hot inputs: tokens per expert [3, 1, 0, 0]
    layer = ms.MoE(4, 8, 4, router="switch", jitter=0.0)
    with torch.no_grad():
        layer.router.gate.weight.copy_(torch.eye(4) * 100)
    x = torch.eye(4)[[0, 0, 0, 1]]
    layer(x)
    s = layer.last_stats
    assert s.tokens_per_expert.tolist() == [3, 1, 0, 0]
    assert s.dropped_fraction == 0.0
    # load (3,1,0,0): mean 1, population std sqrt((4+0+1+1)/4) = sqrt(1.5)
    assert s.load_cv == pytest.approx(math.sqrt(1.5))
    assert s.entropy == pytest.approx(0.0, abs=1e-6)  # one-hot routing probabilities
    assert s.as_dict()["tokens_per_expert"] == [3, 1, 0, 0]


def test_entropy_of_uniform_routing_is_log_E():
    layer = ms.MoE(4, 8, 8, router="topk")
    with torch.no_grad():
        layer.router.gate.weight.zero_()
    layer(torch.randn(10, 4))
    assert layer.last_stats.entropy == pytest.approx(math.log(8), rel=1e-5)


def test_label_by_expert_affinity_and_dead_experts():
    # one-hot inputs force experts: tokens 0-2 -> e0, token 3 -> e1; labels [0, 1, 1, 1]
    layer = ms.MoE(4, 8, 4, router="switch", jitter=0.0)
    with torch.no_grad():
        layer.router.gate.weight.copy_(torch.eye(4) * 100)
    layer(torch.eye(4)[[0, 0, 0, 1]])
    aff = layer.last_stats.affinity(torch.tensor([0, 1, 1, 1]), num_labels=2)
    assert aff.tolist() == [[1, 0, 0, 0], [2, 1, 0, 0]]
    assert layer.last_stats.dead_experts == 2
