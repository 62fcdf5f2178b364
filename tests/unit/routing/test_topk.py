import pytest
import torch

import moesaic as ms
from moesaic.experts.reference import reference_topk
from moesaic.routing.losses import z_loss
from tests.unit.routing._util import route


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_topk_matches_the_per_token_reference(k, normalize):
    router = ms.ROUTERS["topk"](8, 5, k, normalize=normalize)
    x = torch.randn(20, 8)
    r = route(router, x)
    weight = r.weight.detach()
    ref = reference_topk(router.logits(x).softmax(-1), k, normalize)
    for t in range(20):
        got = sorted(
            (int(e), float(w)) for e, w in zip(r.expert[r.token == t], weight[r.token == t])
        )
        want = sorted(ref[t])
        assert [e for e, _ in got] == [e for e, _ in want]
        assert [w for _, w in got] == pytest.approx([w for _, w in want], abs=1e-6)


def test_normalized_weights_sum_to_one_raw_weights_do_not():
    x = torch.randn(10, 8)
    r = route(ms.ROUTERS["topk"](8, 6, 2), x)
    torch.testing.assert_close(r.weight.view(2, 10).sum(0), torch.ones(10))
    raw = route(ms.ROUTERS["topk"](8, 6, 2, normalize=False), x)
    assert (raw.weight.view(2, 10).sum(0) < 1).all()


def test_z_loss_is_the_mean_squared_logsumexp():
    # logits rows [0, 0] and [ln 3, 0]: lse = ln 2 and ln 4 -> z = (ln2^2 + ln4^2) / 2
    logits = torch.tensor([[0.0, 0.0], [torch.log(torch.tensor(3.0)), 0.0]])
    expected = (torch.log(torch.tensor(2.0)) ** 2 + torch.log(torch.tensor(4.0)) ** 2) / 2
    torch.testing.assert_close(z_loss(logits), expected)


@pytest.mark.parametrize(
    "name", ["topk", "noisy_topk", "switch", "gshard", "prototype", "expert_choice", "task"]
)
def test_every_learned_router_reports_a_z_loss_that_trains_the_gate(name):
    opts = {"num_tasks": 2} if name == "task" else {}
    layer = ms.MoE(
        8, 16, 4, router=name, aux_loss_weight=0.0, z_loss_weight=1.0, router_options=opts or None
    )
    torch.nn.init.normal_(layer.router.gate.weight)
    with ms.routing_context(task=1):
        layer(torch.randn(12, 8))
    assert layer.aux_loss.item() > 0
    layer.aux_loss.backward()
    assert layer.router.gate.weight.grad.abs().sum() > 0
