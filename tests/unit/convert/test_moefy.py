"""moefy's arguments, upcycling guarantees and errors, and the aux loss reaching the optimizer."""

import copy

import pytest
import torch
import transformers
from torch import nn

import moesaic as ms


def dense_model(d: int = 8, f: int = 16, layers: int = 4) -> nn.Module:
    return nn.Sequential(
        *(nn.Sequential(nn.Linear(d, f), nn.GELU(), nn.Linear(f, d)) for _ in range(layers))
    )


@pytest.mark.parametrize(
    "router, options",
    [
        ("topk", {"top_k": 1}),
        ("topk", {"top_k": 2}),
        ("topk", {"top_k": 3}),
        ("noisy_topk", {"top_k": 2}),
        ("gshard", {}),
        ("hash", {"top_k": 2}),
        ("cluster", {}),
        ("task", {"router_options": {"num_tasks": 3}}),
    ],
)
def test_upcycled_model_equals_the_dense_model_for_routers_whose_weights_sum_to_one(
    router, options
):
    dense = dense_model().eval()
    model = ms.moefy(copy.deepcopy(dense), num_experts=4, router=router, every=1, **options)
    x = torch.randn(3, 7, 8)
    with ms.routing_context(task=torch.tensor([0, 2, 1])), torch.no_grad():
        torch.testing.assert_close(model(x), dense(x), atol=1e-6, rtol=1e-5)


def test_switch_top1_weight_is_the_raw_probability_so_it_scales_the_dense_output():
    dense = dense_model(layers=1)
    model = ms.moefy(nn.Sequential(copy.deepcopy(dense)), num_experts=4, every=1).eval()
    x = torch.randn(10, 8)
    moe = model[0][0].moe
    p = moe.router.gate(x).softmax(-1).max(-1).values  # switch: y = p_max * FFN(x)
    torch.testing.assert_close(model(x), p[:, None] * dense(x))


def test_every_picks_every_nth_ffn_in_module_order():
    model = ms.moefy(dense_model(layers=5), num_experts=2, every=2)
    assert [isinstance(m[0], ms.convert.MoEFFN) for m in [[b] for b in model]] == [
        False,
        True,
        False,
        True,
        False,
    ]
    assert sum(isinstance(m, ms.MoE) for m in ms.moefy(dense_model(), 2, every=1).modules()) == 4


def test_noise_makes_experts_differ_slightly_and_upcycle_false_gives_fresh_experts():
    dense = dense_model(layers=1)
    w = dense[0][0].weight.detach().t()
    noisy = ms.moefy(copy.deepcopy(dense), 3, every=1, noise=0.01, seed=1)[0].moe.experts.w1
    assert not torch.equal(noisy[0], noisy[1])
    assert (noisy - w).abs().max() < 0.1 * w.abs().max()
    fresh = ms.moefy(copy.deepcopy(dense), 3, every=1, upcycle=False)[0].moe.experts.w1
    assert not torch.allclose(fresh[0], w)


def test_an_unrecognised_model_names_every_pattern_searched():
    model = nn.Sequential(nn.Conv1d(4, 4, 1), nn.LSTM(4, 4))
    with pytest.raises(ValueError) as err:
        ms.moefy(model)
    for pattern in ms.convert.PATTERNS:
        assert pattern[0] in str(err.value)
    assert "found no dense FFN in Sequential" in str(err.value)
    with pytest.raises(ValueError, match="your match"):
        ms.moefy(dense_model(), match=lambda name, module: None)


@pytest.mark.parametrize(
    "kwargs, error, text",
    [
        ({"num_experts": 0}, ValueError, "num_experts=0 must be >= 1"),
        ({"every": 0}, ValueError, "every=0 must be >= 1"),
        ({"every": 1.5}, TypeError, "every=1.5 must be an int"),
        ({"router": "nope"}, ValueError, "router='nope' is not one of"),
        ({"router": ms.ROUTERS["topk"](8, 4)}, TypeError, "must be a name in ms.ROUTERS"),
        ({"noise": -1.0}, ValueError, "noise=-1.0 must be a finite float >= 0"),
        ({"match": 3}, TypeError, "match=3 must be a callable"),
        ({"match": lambda n, m: "yes"}, TypeError, "returned str; expected an ms.convert"),
    ],
)
def test_bad_arguments_are_rejected_with_the_field_value_and_rule(kwargs, error, text):
    with pytest.raises(error, match=text.replace("(", r"\(").replace(".", r"\.")):
        ms.moefy(dense_model(), **kwargs)


def test_a_user_adapter_for_an_unsupported_activation_is_refused_clearly():
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 4)))
    with pytest.raises(ValueError, match="found no dense FFN"):
        ms.moefy(model)  # tanh is no expert activation, so Sequential(Linear, Tanh, Linear) is
        # not an FFN moefy can convert exactly


def test_moefied_gpt2_trains_20_steps_and_its_aux_loss_reaches_the_optimizer():
    cfg = transformers.GPT2Config(
        vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2, n_inner=48
    )
    model = ms.moefy(transformers.GPT2LMHeadModel(cfg), num_experts=4, every=1)
    moes = [m for m in model.modules() if isinstance(m, ms.MoE)]
    ids = torch.randint(0, 64, (4, 12))
    # the aux loss alone gives every router a gradient
    model(ids)
    ms.aux_loss(model).backward()
    assert all(m.router.gate.weight.grad.abs().sum() > 0 for m in moes)
    model.zero_grad()
    gates = [m.router.gate.weight.detach().clone() for m in moes]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        out = model(ids, labels=ids)
        aux = ms.aux_loss(model)
        assert aux.requires_grad and aux > 0
        (out.loss + aux).backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0]
    assert all(not torch.equal(g, m.router.gate.weight) for g, m in zip(gates, moes))


def test_a_model_that_is_itself_the_ffn_is_refused_before_anything_changes():
    ffn = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(ValueError, match="cannot replace the model itself"):
        ms.moefy(ffn, every=1)
    assert isinstance(ffn[0], nn.Linear)
    assert isinstance(ms.moefy(nn.Sequential(ffn), 2, every=1)[0], ms.convert.MoEFFN)


def test_a_config_builds_the_same_layers_as_the_keywords_and_takes_its_width_from_each_ffn():
    dense = dense_model()
    torch.manual_seed(0)
    by_keywords = ms.moefy(copy.deepcopy(dense), 4, "topk", every=1, top_k=2, shared_d_ff=4)
    cfg = ms.MoEConfig(num_experts=4, router="topk", top_k=2, shared_d_ff=4)
    torch.manual_seed(0)
    by_config = ms.moefy(copy.deepcopy(dense), every=1, config=cfg)
    for a, b in zip(by_keywords.state_dict().items(), by_config.state_dict().items()):
        assert a[0] == b[0] and torch.equal(a[1], b[1])
    layer = next(m for m in by_config.modules() if isinstance(m, ms.MoE))
    assert layer.config.d_model is not None and layer.config.shared_d_ff == 4
    with pytest.raises(TypeError, match=r"not both: got config and \['top_k'\]"):
        ms.moefy(copy.deepcopy(dense), config=cfg, top_k=2)
    with pytest.raises(ValueError, match="d_model=3 conflicts with the dense FFN '0': d_model="):
        ms.moefy(copy.deepcopy(dense), every=1, config=ms.MoEConfig(num_experts=2, d_model=3))
