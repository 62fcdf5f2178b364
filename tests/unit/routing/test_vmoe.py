"""V-MoE's router (Riquelme et al. 2021): noise N(0, (1/E)^2) before the softmax, top-k of the
noisy softmax with its raw values as weights, importance loss on the clean softmax and the load
loss of vmoe's code; all against formulas written out here in float64."""

from __future__ import annotations

import math

import pytest
import torch

import moesaic as ms


def _router(D=6, E=4, k=2, **kw):
    torch.manual_seed(0)
    return ms.ROUTERS["vmoe"](D, E, k, **kw)


def _cv2(v: torch.Tensor) -> torch.Tensor:
    return v.var(correction=0) / v.mean() ** 2


def test_logit_noise_has_std_one_over_e():
    E, T = 8, 100_000
    router = _router(D=4, E=E, k=1).train()
    torch.nn.init.zeros_(router.gate.weight)  # logits 0: the softmax input is the noise alone
    routing = router(torch.randn(T, 4), ms.context.current_context())
    log_p = routing.probs_TE.double().log()
    centred = log_p - log_p.mean(dim=1, keepdim=True)  # = eps_i - mean(eps)
    std = centred.std() / math.sqrt(1 - 1 / E)
    assert abs(std.item() - 1 / E) / (1 / E) < 0.02


def test_training_routing_and_losses_follow_vmoe():
    T, D, E, K = 64, 6, 5, 2
    router = _router(D, E, K).train()
    x = torch.randn(T, D)
    torch.manual_seed(123)
    routing = router(x, ms.context.current_context())
    # the reference draws the same noise: one randn_like of the (T, E) logits after the seed
    torch.manual_seed(123)
    logits = x.double() @ router.gate.weight.double().t()
    noisy = logits + torch.randn(T, E).double() / E
    probs = noisy.softmax(-1)
    top = probs.topk(K, dim=-1)
    assert torch.equal(routing.expert.view(K, T).t(), top.indices)
    torch.testing.assert_close(routing.weight.view(K, T).t().double(), top.values)
    assert (routing.weight.view(K, T).sum(0) < 1).all()  # raw softmax values: not renormalised
    importance = _cv2(logits.softmax(-1).sum(0))
    threshold = noisy.sort(dim=-1, descending=True).values[:, K - 1 : K]
    normal = torch.distributions.Normal(0.0, 1.0)
    p = 1 - normal.cdf((threshold - logits) * E)
    load = _cv2(p.mean(0))
    torch.testing.assert_close(routing.aux_loss.double(), importance + load, rtol=1e-5, atol=1e-7)


def test_evaluation_is_deterministic_and_counts_importance_only():
    router = _router().eval()
    x = torch.randn(32, 6)
    a = router(x, ms.context.current_context())
    b = router(x, ms.context.current_context())
    assert torch.equal(a.expert, b.expert) and torch.equal(a.weight, b.weight)
    clean = (x @ router.gate.weight.t()).softmax(-1)
    torch.testing.assert_close(a.probs_TE, clean)
    torch.testing.assert_close(a.aux_loss, _cv2(clean.sum(0)))


def test_noise_std_zero_turns_noise_and_load_loss_off():
    router = _router(noise_std=0.0).train()
    x = torch.randn(16, 6)
    routing = router(x, ms.context.current_context())
    clean = (x @ router.gate.weight.t()).softmax(-1)
    torch.testing.assert_close(routing.probs_TE, clean)
    torch.testing.assert_close(routing.aux_loss, _cv2(clean.sum(0)))


def test_priority_is_the_largest_weight_for_batch_prioritized_routing():
    router = _router().eval()
    routing = router(torch.randn(10, 6), ms.context.current_context())
    w = routing.weight.view(2, 10)
    assert torch.equal(routing.priority, w.amax(0).repeat(2))


@pytest.mark.parametrize(
    "options,named",
    [
        ({"noise_std": -1.0}, "noise_std=-1.0"),
        ({"score_func": "sigmoid"}, "score_func: not available"),
    ],
)
def test_bad_options_are_refused_naming_them(options, named):
    with pytest.raises(ValueError, match=named):
        ms.ROUTERS["vmoe"](6, 4, 2, **options)


def test_bpr_with_the_vmoe_router_keeps_each_experts_highest_priority_first_choices():
    """Through the layer: per expert, the kept first choices are exactly the highest-priority
    ones among the tokens whose first choice it is (capacity permitting), and no second choice
    takes a slot while a first choice waits."""
    torch.manual_seed(1)
    T, E, K = 64, 4, 2
    layer = ms.MoE(8, 16, E, router="vmoe", top_k=K, capacity_factor=0.5,
                   drop_policy="priority").eval()  # fmt: skip
    seen = []
    layer.router.register_forward_hook(lambda m, a, out: seen.append(out))
    layer(torch.randn(T, 8))
    routing, stats = seen[0], layer.last_stats
    C = layer.capacity(T)
    expert_TK = routing.expert.view(K, T).t()
    priority_T = routing.weight.view(K, T).amax(0)
    kept = stats.kept_token_A.tolist()
    offsets = [0, *torch.cumsum(stats.tokens_per_expert, 0).tolist()]
    for e in range(E):
        mine = set(kept[offsets[e] : offsets[e + 1]])
        first = [t for t in range(T) if expert_TK[t, 0] == e]
        best = sorted(first, key=lambda t: (-priority_T[t].item(), t))[:C]
        assert set(best) <= mine  # the best first choices are all kept
        if len(first) >= C:  # capacity full of first choices: no second choice got in
            assert mine == set(best)
