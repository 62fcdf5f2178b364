"""Property tests: random shapes, routers and capacities against experts/reference.py."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moesaic as ms
from moesaic.experts.reference import reference_moe
from tests.cases import capture_routing


@st.composite
def layer_configs(draw):
    E = draw(st.integers(1, 8))
    router = draw(
        st.sampled_from(
            ["topk", "noisy_topk", "gshard", "prototype", "expert_choice", "hash", "switch"]
        )
    )
    if router == "gshard":
        E = max(E, 2)
        k = 2
    elif router == "switch":
        k = 1
    elif router == "prototype":
        k = draw(st.sampled_from([d for d in range(1, E + 1) if E % d == 0]))
    else:
        k = draw(st.integers(1, E))
    return {
        "num_experts": E,
        "router": router,
        "top_k": k,
        "capacity_factor": draw(st.one_of(st.none(), st.floats(0.1, 3.0))),
        "drop_policy": draw(st.sampled_from(["position", "priority"])),
        "activation": draw(st.sampled_from(["gelu", "swiglu"])),
    }


@settings(max_examples=60, deadline=None)
@given(cfg=layer_configs(), T=st.integers(1, 24), training=st.booleans(), seed=st.integers(0, 99))
def test_layer_equals_reference_on_random_configurations(cfg, T, training, seed):
    torch.manual_seed(seed)
    layer = ms.MoE(6, 10, **cfg).train(training)
    seen = capture_routing(layer)
    x = torch.randn(T, 6)
    y = layer(x)
    ref = reference_moe(x, seen[-1], layer.experts, layer.capacity(T), cfg["drop_policy"])
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    stats = layer.last_stats
    C = layer.capacity(T)
    if C is not None:
        assert int(stats.tokens_per_expert.max()) <= C
    assert int(stats.tokens_per_expert.sum()) <= int(stats.requested_per_expert.sum())
    assert 0.0 <= stats.dropped_fraction <= 1.0
