"""Router replay: a replayed forward equals the recorded one bit for bit, outputs and gradients,
for every router, stochastic ones included; the recorded decisions win over new parameters."""

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import moesaic as ms
from tests.cases import ROUTER_CASES, RouterCase, capture_routing


def _layer(case: RouterCase) -> ms.MoE:
    torch.manual_seed(0)
    layer = case.layer()
    for name in ("gate", "noise"):  # spread the scores so that random choices do differ
        if hasattr(layer.router, name):
            torch.nn.init.normal_(getattr(layer.router, name).weight)
    return layer


def _forward_backward(layer: ms.MoE, case: RouterCase, x: torch.Tensor, g: torch.Tensor):
    """Output, aux loss and the gradients of x and of every parameter."""
    x = x.clone().requires_grad_()
    with case.context(batch=3):
        y = layer(x)
    aux = layer.aux_loss
    params = [x] + [p for p in layer.parameters() if p.requires_grad]
    grads = torch.autograd.grad((y * g).sum() + aux, params, allow_unused=True)
    return [y.detach(), aux.detach()] + [a for a in grads if a is not None]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("capacity_factor", [None, 1.0])
@pytest.mark.parametrize("case", ROUTER_CASES, ids=lambda c: c.id)
def test_replay_gives_bit_identical_outputs_and_gradients(case, capacity_factor, training):
    layer = _layer(case)
    layer.capacity_factor = capacity_factor
    layer.train(training)
    x, g = torch.randn(3, 5, 8), torch.randn(3, 5, 8)
    with ms.record_routing() as recorder:
        recorded = _forward_backward(layer, case, x, g)
    with ms.replay_routing(recorder):
        replayed = _forward_backward(layer, case, x, g)
    assert len(recorded) == len(replayed)
    for a, b in zip(recorded, replayed):
        assert torch.equal(a, b)
    if training and case.stochastic_in_training:  # the check above can fail: a plain rerun differs
        again = _forward_backward(layer, case, x, g)
        assert not all(torch.equal(a, b) for a, b in zip(recorded, again))


def test_the_recorder_holds_each_call_in_order():
    layer = ms.MoE(8, 16, 4, router="topk", top_k=2)
    seen = capture_routing(layer)
    with ms.record_routing() as recorder:
        layer(torch.randn(6, 8))
        layer(torch.randn(4, 8))
    assert recorder.routers() == [layer.router] and len(recorder) == 2
    for record, routing in zip(recorder[layer.router], seen):
        assert torch.equal(record.token, routing.token)
        assert torch.equal(record.expert, routing.expert)
        assert torch.equal(record.choice, routing.choice)
        assert record.dense_k == routing.dense_k == 2
    assert [r.shape for r in recorder[layer.router]] == [(6, 8), (4, 8)]


def test_replay_keeps_the_recorded_experts_and_weights_them_by_the_current_gate():
    torch.manual_seed(0)
    layer = ms.MoE(8, 16, 4, router="topk", top_k=2)
    x = torch.randn(10, 8)
    seen = capture_routing(layer)
    with ms.record_routing() as recorder:
        layer(x)
    with torch.no_grad():
        layer.router.gate.weight.copy_(torch.randn(4, 8))  # new parameters choose other experts
    with ms.replay_routing(recorder):
        layer(x)
    layer(x)
    first, replayed, fresh = seen
    assert torch.equal(replayed.expert, first.expert)
    assert not torch.equal(fresh.expert, first.expert)  # without replay the new gate chooses
    probs = (x @ layer.router.gate.weight.t()).softmax(dim=-1)
    chosen = probs.gather(1, first.expert.view(2, 10).t())  # (T, 2): choice-major layout
    want = (chosen / chosen.sum(dim=1, keepdim=True)).t().reshape(-1)
    torch.testing.assert_close(replayed.weight.detach(), want)


def test_replay_leaves_the_random_generator_where_the_recorded_call_did():
    layer = ms.MoE(8, 16, 4, router="noisy_topk").train()
    x = torch.randn(6, 8)
    with ms.record_routing() as recorder:
        layer(x)
        after_record = torch.rand(4)
    torch.rand(100)  # move the generator on
    with ms.replay_routing(recorder):
        layer(x)
        after_replay = torch.rand(4)
    assert torch.equal(after_record, after_replay)


def test_a_checkpointed_layer_recomputes_under_replay_exactly():
    layer = ms.MoE(8, 16, 4, router="gshard").train()
    torch.nn.init.normal_(layer.router.gate.weight)
    x = torch.randn(12, 8, requires_grad=True)
    with ms.record_routing() as recorder:
        y = checkpoint(layer, x, use_reentrant=False)
    with ms.replay_routing(recorder):
        y.sum().backward()  # the recomputation consumes the record
    grad_checkpointed = (x.grad.clone(), layer.router.gate.weight.grad.clone())
    x.grad, layer.router.gate.weight.grad = None, None
    with ms.replay_routing(recorder):
        y_plain = layer(x)
    y_plain.sum().backward()
    assert torch.equal(y.detach(), y_plain.detach())
    assert torch.equal(grad_checkpointed[0], x.grad)
    assert torch.equal(grad_checkpointed[1], layer.router.gate.weight.grad)


def test_running_out_of_records_is_an_error():
    layer = ms.MoE(8, 16, 4, router="switch")
    x = torch.randn(6, 8)
    with ms.record_routing() as recorder:
        layer(x)
    with ms.replay_routing(recorder), pytest.raises(ValueError, match="called 2 times but the"):
        layer(x)
        layer(x)
    other = ms.MoE(8, 16, 4, router="switch")
    with ms.replay_routing(recorder), pytest.raises(ValueError, match="called 1 times but the"):
        other(x)


def test_a_shape_mismatch_is_an_error():
    layer = ms.MoE(8, 16, 4, router="base")
    with ms.record_routing() as recorder:
        layer(torch.randn(6, 8))
    with ms.replay_routing(recorder), pytest.raises(ValueError, match=r"x_TD.shape=\(7, 8\)"):
        layer(torch.randn(7, 8))


def test_replaying_in_another_mode_is_an_error():
    layer = ms.MoE(8, 16, 4, router="gshard").train()
    x = torch.randn(6, 8)
    with ms.record_routing() as recorder:
        layer(x)
    with ms.replay_routing(recorder), pytest.raises(ValueError, match="another mode"):
        layer.eval()(x)


def test_sessions_do_not_nest_and_replay_needs_a_recorder():
    with ms.record_routing() as recorder, pytest.raises(RuntimeError, match="cannot nest"):
        with ms.replay_routing(recorder):
            pass
    with pytest.raises(TypeError, match="recorder must be the RoutingRecorder"):
        with ms.replay_routing([]):
            pass
