"""Bad input: a clear ValueError / TypeError naming the argument, the value and the rule."""

import pytest
import torch

import moesaic as ms

BAD_CONSTRUCTOR_ARGS = [
    (
        {"router": "nope"},
        ValueError,
        r"router='nope' is not one of \['base', 'cluster', 'expert_choice'",
    ),
    ({"router": 3}, TypeError, "router=3 must be a name"),
    ({"top_k": 0, "router": "topk"}, ValueError, "top_k=0 must be >= 1"),
    ({"top_k": 9, "router": "topk"}, ValueError, "top_k=9 must be <= num_experts=8"),
    ({"top_k": 1.5, "router": "topk"}, TypeError, "top_k=1.5 must be an int"),
    ({"capacity_factor": 0.0}, ValueError, "capacity_factor=0.0 must be > 0"),
    ({"capacity_factor": -1.0}, ValueError, "capacity_factor=-1.0 must be"),
    ({"capacity_factor": float("nan")}, ValueError, "capacity_factor=nan must be"),
    ({"capacity_factor": "1"}, TypeError, "capacity_factor='1' must be a float"),
    ({"drop_policy": "random"}, ValueError, r"drop_policy='random' is not one of \['position'"),
    ({"activation": "tanh"}, ValueError, "activation='tanh' is not one of"),
    ({"num_experts": 0}, ValueError, "num_experts=0 must be >= 1"),
    ({"d_model": -2}, ValueError, "d_model=-2 must be >= 1"),
    ({"d_ff": 0}, ValueError, "d_ff=0 must be >= 1"),
    ({"aux_loss_weight": -0.1}, ValueError, "aux_loss_weight=-0.1 must be"),
    ({"z_loss_weight": "x"}, TypeError, "z_loss_weight='x' must be a float"),
    ({"shared_d_ff": -1}, ValueError, "shared_d_ff=-1 must be an int >= 0"),
    ({"shared_gate": True}, ValueError, r"shared_gate=True needs shared_d_ff > 0"),
    ({"shared_gate": 1, "shared_d_ff": 4}, TypeError, "shared_gate=1 must be a bool"),
    ({"jitter": 1.5}, ValueError, r"jitter=1.5 must be a float in \[0, 1\)"),
    ({"router_dtype": torch.int32}, TypeError, "router_dtype=torch.int32 must be a floating"),
    ({"router": "task"}, TypeError, "num_tasks"),
    (
        {"router": "task", "router_options": {"num_tasks": 0}},
        ValueError,
        "num_tasks=0 must be >= 1",
    ),
    ({"router_options": {"bogus": 1}}, TypeError, "router_options for router='switch'.*bogus"),
    ({"expert_backend": "cuda"}, ValueError, "backend='cuda' is not one of"),
]


@pytest.mark.parametrize(
    "kwargs,error,match", BAD_CONSTRUCTOR_ARGS, ids=[str(a[0]) for a in BAD_CONSTRUCTOR_ARGS]
)
def test_bad_constructor_arguments_are_named(kwargs, error, match):
    args = {"d_model": 8, "d_ff": 16, "num_experts": 8, **kwargs}
    with pytest.raises(error, match=match):
        ms.MoE(**args)


BAD_INPUTS = [
    (torch.randn(3, 7), ValueError, r"x.shape=\(3, 7\): the last dim must equal d_model=8"),
    (torch.randn(()), ValueError, "the last dim must equal d_model=8"),
    (torch.ones(3, 8, dtype=torch.long), TypeError, "x.dtype=torch.int64 must be a floating"),
    (torch.randn(3, 8, dtype=torch.float64), TypeError, "x.dtype=torch.float64 must match"),
    ([[0.0] * 8], TypeError, "x must be a torch.Tensor, got list"),
]


@pytest.mark.parametrize("x,error,match", BAD_INPUTS, ids=["width", "scalar", "int", "f64", "list"])
def test_bad_inputs_are_named(x, error, match):
    layer = ms.MoE(8, 16, 4)
    with pytest.raises(error, match=match):
        layer(x)


def test_router_instance_must_agree_with_the_layer():
    router = ms.ROUTERS["topk"](8, 4, 2)
    with pytest.raises(ValueError, match="router.num_experts=4 must equal num_experts=8"):
        ms.MoE(8, 16, 8, router=router)
    with pytest.raises(ValueError, match="router.top_k=2 must equal top_k=1"):
        ms.MoE(8, 16, 4, router=router, top_k=1)
    assert ms.MoE(8, 16, 4, router=router).router is router


def test_routing_context_rejects_non_integer_ids():
    with pytest.raises(TypeError, match="integer ids"):
        with ms.routing_context(task=torch.tensor([0.5])):
            pass
    with pytest.raises(TypeError, match="must be an int or a LongTensor"):
        with ms.routing_context(task="nlp"):
            pass
