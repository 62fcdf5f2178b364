"""DeepSeek-style options of the token-choice top-k router: sigmoid scores, route_scale and
group-limited routing, each against a slow per-token reference; what each router family accepts."""

from __future__ import annotations

import math

import pytest
import torch

import moesaic as ms
from tests.unit.routing._util import route


def _per_token(r, T: int) -> list[list[tuple[int, float]]]:
    """The routing as one list of (expert, weight) per token, in choice order."""
    weight = r.weight.detach()
    out = []
    for t in range(T):
        at = (r.token == t).nonzero().flatten().tolist()
        at.sort(key=lambda a: int(r.choice[a]))
        out.append([(int(r.expert[a]), float(weight[a])) for a in at])
    return out


def reference_route(
    logits_TE: torch.Tensor,
    k: int,
    *,
    score_func: str = "softmax",
    normalize: bool = True,
    route_scale: float = 1.0,
    n_groups: int = 1,
    topk_groups: int | None = None,
    group_score: str = "top2_sum",
    bias: list[float] | None = None,
) -> list[list[tuple[int, float]]]:
    """DeepSeek-V3's gate written out per token in plain Python (model.py's ``Gate.forward``)."""
    out = []
    for row in logits_TE.tolist():
        E = len(row)
        if score_func == "softmax":
            m = max(row)
            ex = [math.exp(v - m) for v in row]
            scores = [v / sum(ex) for v in ex]
        else:
            scores = [1.0 / (1.0 + math.exp(-v)) for v in row]
        choose = [s + (bias[e] if bias else 0.0) for e, s in enumerate(scores)]
        eligible = set(range(E))
        if topk_groups is not None and topk_groups < n_groups:
            G = E // n_groups
            groups = []
            for g in range(n_groups):
                members = sorted((choose[e] for e in range(g * G, (g + 1) * G)), reverse=True)
                groups.append(sum(members[:2]) if group_score == "top2_sum" else members[0])
            best = sorted(range(n_groups), key=lambda g: -groups[g])[:topk_groups]
            eligible = {e for g in best for e in range(g * G, (g + 1) * G)}
        chosen = sorted(eligible, key=lambda e: -choose[e])[:k]
        total = sum(scores[e] for e in chosen) if normalize else 1.0
        out.append([(e, route_scale * scores[e] / total) for e in chosen])
    return out


def _assert_same(got, want):
    assert [[e for e, _ in t] for t in got] == [[e for e, _ in t] for t in want]
    for g, w in zip(got, want):
        assert [x for _, x in g] == pytest.approx([x for _, x in w], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("route_scale", [1.0, 2.5])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_sigmoid_scores_match_the_per_token_reference(k, normalize, route_scale):
    router = ms.ROUTERS["topk"](
        8, 6, k, score_func="sigmoid", normalize=normalize, route_scale=route_scale
    )
    torch.nn.init.normal_(router.gate.weight)
    x = torch.randn(40, 8)
    r = route(router, x)
    logits = router.logits(x)
    want = reference_route(
        logits, k, score_func="sigmoid", normalize=normalize, route_scale=route_scale
    )
    _assert_same(_per_token(r, 40), want)
    # statistics and the aux loss see the sigmoid scores normalised per token
    s = logits.sigmoid()
    torch.testing.assert_close(r.probs_TE, s / s.sum(-1, keepdim=True))
    torch.testing.assert_close(r.probs_TE.sum(-1), torch.ones(40))


def test_softmax_with_route_scale_is_the_plain_router_times_the_scale():
    torch.manual_seed(0)
    plain = ms.ROUTERS["topk"](8, 6, 2)
    scaled = ms.ROUTERS["topk"](8, 6, 2, route_scale=2.5)
    scaled.load_state_dict(plain.state_dict())
    x = torch.randn(10, 8)
    a, b = route(plain, x), route(scaled, x)
    assert torch.equal(a.expert, b.expert)
    torch.testing.assert_close(b.weight, 2.5 * a.weight)


@pytest.mark.parametrize("group_score", ["top2_sum", "max"])
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize(
    ("E", "n_groups", "topk_groups", "k"),
    [(16, 4, 2, 4), (16, 4, 1, 3), (12, 6, 3, 2), (8, 8, 3, 3), (12, 3, 2, 8)],
)
def test_group_limited_topk_matches_the_per_token_reference(
    E, n_groups, topk_groups, k, score_func, group_score
):
    router = ms.ROUTERS["topk"](
        8,
        E,
        k,
        score_func=score_func,
        n_groups=n_groups,
        topk_groups=topk_groups,
        group_score=group_score,
    )
    torch.nn.init.normal_(router.gate.weight)
    x = torch.randn(50, 8)
    r = route(router, x)
    opts = dict(score_func=score_func, n_groups=n_groups, topk_groups=topk_groups)
    want = reference_route(router.logits(x), k, group_score=group_score, **opts)
    got = _per_token(r, 50)
    _assert_same(got, want)
    G = E // n_groups
    for t in got:  # every token's experts lie in at most topk_groups groups
        assert len({e // G for e, _ in t}) <= topk_groups


def test_group_limited_routing_with_the_balance_bias_matches_the_reference():
    router = ms.ROUTERS["topk"](
        8, 16, 4, score_func="sigmoid", n_groups=4, topk_groups=2, balance_rate=0.01
    )
    torch.nn.init.normal_(router.gate.weight)
    bias = torch.linspace(-0.3, 0.3, 16)
    router.balance_bias.copy_(bias)
    x = torch.randn(50, 8)
    r = route(router, x)
    want = reference_route(
        router.logits(x),
        4,
        score_func="sigmoid",
        n_groups=4,
        topk_groups=2,
        bias=bias.tolist(),
    )
    _assert_same(_per_token(r, 50), want)


def test_group_limiting_changes_the_choice_only_where_the_groups_forbid_it():
    """Unlimited, token 0 takes experts 0 and 2 and token 1 experts 3 and 0, each pair from both
    groups of two; with one kept group ("max": the group of the largest score), each token picks
    inside its best group only."""
    router = ms.ROUTERS["topk"](4, 4, 2, n_groups=2, topk_groups=1, group_score="max")
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(4))
    x = torch.tensor([[3.0, 0.0, 2.9, 2.8], [1.0, 0.9, 0.0, 5.0]])
    got = [[e for e, _ in t] for t in _per_token(route(router, x), 2)]
    assert got == [[0, 1], [3, 2]]


def test_switch_takes_sigmoid_scores_and_keeps_the_raw_score_as_weight():
    router = ms.ROUTERS["switch"](8, 4, score_func="sigmoid", jitter=0.0)
    x = torch.randn(12, 8)
    r = route(router, x)
    s = router.logits(x).sigmoid()
    torch.testing.assert_close(r.weight, s.max(-1).values)
    assert torch.equal(r.expert, s.argmax(-1))


def test_gshard_takes_the_deepseek_options_except_route_scale():
    router = ms.ROUTERS["gshard"](8, 8, score_func="sigmoid", n_groups=4, topk_groups=2)
    r = route(router.eval(), torch.randn(10, 8))
    torch.testing.assert_close(r.weight.view(2, 10).sum(0), torch.ones(10))
    with pytest.raises(ValueError, match="route_scale=2.0 is not available for router='gshard'"):
        ms.ROUTERS["gshard"](8, 8, route_scale=2.0)


def test_gshard_counts_the_load_after_its_random_second_expert_rule():
    torch.manual_seed(0)
    router = ms.ROUTERS["gshard"](8, 4, balance_rate=0.01)
    r = route(router, torch.randn(64, 8))
    assert r.num_assignments < 128  # some second choices were dropped
    counts = torch.bincount(r.expert, minlength=4)
    assert torch.equal(router.balance_counts, counts)


def test_task_router_takes_sigmoid_scores():
    router = ms.ROUTERS["task"](8, 6, 2, num_tasks=3, score_func="sigmoid")
    r = route(router, torch.randn(5, 8), task=1)
    logits = router.logits(router.task_embedding.weight)[1:2].expand(5, -1)
    _assert_same(_per_token(r, 5), reference_route(logits, 2, score_func="sigmoid"))


@pytest.mark.parametrize(
    ("name", "option"),
    [
        ("noisy_topk", {"score_func": "sigmoid"}),
        ("noisy_topk", {"balance_rate": 0.001}),
        ("prototype", {"n_groups": 2}),
        ("prototype", {"route_scale": 2.0}),
    ],
)
def test_routers_outside_the_topk_family_refuse_its_options_by_name(name, option):
    (key,) = option
    with pytest.raises(ValueError, match=f"{key}: not available for router='{name}'"):
        ms.MoE(8, 16, 4, router=name, router_options=option)


@pytest.mark.parametrize(
    ("options", "k", "error", "message"),
    [
        ({"score_func": "tanh"}, 2, ValueError, "score_func='tanh' is not one of"),
        ({"route_scale": 0.0}, 2, ValueError, "route_scale=0.0 must be > 0"),
        ({"route_scale": "2"}, 2, TypeError, "route_scale='2' must be a float"),
        ({"n_groups": 3}, 2, ValueError, "n_groups=3 must divide num_experts=8"),
        ({"n_groups": 0}, 2, ValueError, "n_groups=0 must be >= 1"),
        ({"n_groups": 4, "topk_groups": 5}, 2, ValueError, "topk_groups=5 must be <= n_groups=4"),
        ({"n_groups": 4, "topk_groups": 0}, 2, ValueError, "topk_groups=0 must be >= 1"),
        ({"n_groups": 4, "topk_groups": 1}, 3, ValueError, "top_k=3 must be <= topk_groups"),
        ({"topk_groups": 2}, 2, ValueError, "topk_groups=2 must be <= n_groups=1"),
        ({"group_score": "mean"}, 2, ValueError, "group_score='mean' is not one of"),
        ({"balance_rate": -1e-3}, 2, ValueError, "balance_rate=-0.001 must be a finite float"),
        ({"balance_rate": True}, 2, TypeError, "balance_rate=True must be a float"),
    ],
)
def test_bad_options_fail_with_one_line_naming_the_option(options, k, error, message):
    with pytest.raises(error, match=message.replace("(", r"\(").replace("[", r"\[")):
        ms.MoE(8, 16, 8, router="topk", top_k=k, router_options=options)


def test_the_default_router_has_no_balance_state_and_an_unchanged_state_dict():
    router = ms.ROUTERS["topk"](8, 4, 2)
    assert list(router.state_dict()) == ["gate.weight"]
    assert router.balance_bias is None and router.balance_counts is None


def test_empty_input_routes_to_nothing_with_every_option():
    router = ms.ROUTERS["topk"](
        8, 16, 4, score_func="sigmoid", n_groups=4, topk_groups=2, balance_rate=0.01
    )
    r = route(router, torch.randn(0, 8))
    assert r.num_assignments == 0 and int(router.balance_counts.sum()) == 0
