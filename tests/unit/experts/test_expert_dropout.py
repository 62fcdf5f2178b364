"""Expert dropout (Fedus et al. 2022, §4.2): on the experts' hidden units, in training only."""

import pytest
import torch
from torch.nn import functional as F

import moesaic as ms


def _layer(p: float, backend: str = "auto") -> ms.MoE:
    torch.manual_seed(0)
    return ms.MoE(
        d_model=16,
        d_ff=32,
        num_experts=4,
        router="topk",
        top_k=2,
        expert_dropout=p,
        expert_backend=backend,
    )


def test_eval_mode_ignores_expert_dropout():
    x = torch.randn(40, 16)
    plain, dropped = _layer(0.0).eval(), _layer(0.6).eval()
    assert torch.equal(plain(x), dropped(x))


def test_training_drops_hidden_units_exactly_as_a_hand_loop():
    layer = _layer(0.5, backend="cpu")  # training with dropout runs the plain loop anyway
    x = torch.randn(30, 16)
    torch.manual_seed(7)
    y = layer(x)
    # The same computation by hand: route, then each expert's rows in expert order with the
    # same RNG stream, each hidden unit kept with probability 1-p and scaled by 1/(1-p).
    routing = layer.router(x, ms.context.current_context())  # top-k draws no random numbers
    torch.manual_seed(7)
    w = layer.experts
    out = torch.zeros_like(x)
    order = torch.argsort(routing.expert, stable=True)
    for e in range(4):
        rows = order[routing.expert[order] == e]
        if rows.numel() == 0:
            continue
        tok = routing.token[rows]
        h = F.dropout(F.gelu(x[tok] @ w.w1[e]), 0.5)
        out.index_add_(0, tok, (h @ w.w2[e]) * routing.weight[rows, None])
    torch.testing.assert_close(y, out, rtol=1e-5, atol=1e-6)


def test_dropout_changes_training_outputs_and_leaves_the_router_alone():
    x = torch.randn(64, 16)
    plain, dropped = _layer(0.0), _layer(0.5)
    torch.manual_seed(1)
    a = plain(x)
    torch.manual_seed(1)
    b = dropped(x)
    assert not torch.allclose(a, b)
    assert torch.equal(plain.last_stats.tokens_per_expert, dropped.last_stats.tokens_per_expert)


def test_bad_rate_is_one_line():
    with pytest.raises(ValueError, match=r"expert_dropout=1.0 must be < 1"):
        _layer(1.0)
