import pytest
import torch

import moesaic as ms
from moesaic.routing.losses import balance_loss
from tests.unit.routing._util import route


def test_one_expert_in_each_group_with_the_groups_softmax_weight():
    router = ms.ROUTERS["prototype"](8, 6, 2)
    x = torch.randn(30, 8)
    r = route(router, x)
    logits = router.logits(x).view(30, 2, 3)
    first, second = r.expert[:30], r.expert[30:]
    assert (first < 3).all() and (second >= 3).all()
    probs = logits.softmax(-1)
    torch.testing.assert_close(r.weight[:30], probs[:, 0].max(-1).values)
    torch.testing.assert_close(r.weight[30:], probs[:, 1].max(-1).values)
    # counts per group sum to T
    counts = torch.bincount(r.expert, minlength=6)
    assert counts[:3].sum() == 30 and counts[3:].sum() == 30
    want = (
        balance_loss(probs[:, 0], probs[:, 0].argmax(-1))
        + balance_loss(probs[:, 1], probs[:, 1].argmax(-1))
    ) / 2
    torch.testing.assert_close(r.aux_loss, want)


def test_one_prototype_equals_switch_top1():
    # Yang et al. 2021 (M6-T)
    proto = ms.ROUTERS["prototype"](8, 4, 1).eval()
    switch = ms.ROUTERS["switch"](8, 4).eval()
    switch.load_state_dict(proto.state_dict())
    x = torch.randn(25, 8)
    a, b = route(proto, x), route(switch, x)
    assert torch.equal(a.expert, b.expert)
    torch.testing.assert_close(a.weight, b.weight)
    torch.testing.assert_close(a.aux_loss, b.aux_loss)


def test_experts_must_divide_into_groups():
    import pytest

    with pytest.raises(ValueError, match="divisible by top_k=3"):
        ms.MoE(8, 16, 8, router="prototype", top_k=3)


def test_experts_not_divisible_into_the_k_groups_are_refused():
    with pytest.raises(ValueError, match="num_experts=5 must be divisible by top_k=2"):
        ms.MoE(6, 10, 5, router="prototype", top_k=2)
