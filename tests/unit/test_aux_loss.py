"""``layer.aux_loss`` / ``ms.aux_loss(model)`` sum every training forward since the sum was last
read or back-propagated: a layer called twice in one step counts both calls, and an ordinary
training loop (with validation in between) gets each step's own aux loss."""

from __future__ import annotations

import copy

import torch
from torch import nn

import moesaic as ms


def _layer() -> ms.MoE:
    torch.manual_seed(0)
    return ms.MoE(d_model=8, d_ff=16, num_experts=4, router="topk", jitter=0.0, z_loss_weight=0.1)


def _alone(layer: ms.MoE, x: torch.Tensor) -> torch.Tensor:
    """The aux loss of one forward of a fresh copy of ``layer``."""
    twin = copy.deepcopy(layer)
    twin(x)
    return twin.aux_loss


def test_a_layer_called_twice_counts_both_calls():
    layer = _layer()
    x1 = torch.randn(6, 8)
    x2 = copy.deepcopy(layer)(x1).tanh().detach()  # what the second call sees
    want = _alone(layer, x1) + _alone(layer, x2)
    y = layer(layer(x1).tanh())  # weight sharing: the same layer twice in one forward
    got = ms.aux_loss(layer)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    stats = layer.last_stats  # the last call's statistics: 6 tokens, k=2
    assert stats.tokens_per_expert.sum() == 12
    (y.sum() + got).backward()
    assert layer.router.gate.weight.grad is not None


def test_a_training_loop_gets_each_steps_own_aux_loss_and_validation_never_leaks():
    layer = _layer()
    model = nn.Sequential(nn.Linear(8, 8), layer)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        x = torch.randn(7, 8)
        want = _alone(layer, model[0](x).detach())
        loss = model(x).square().mean() + ms.aux_loss(model)
        torch.testing.assert_close(ms.aux_loss(model), want, rtol=0, atol=0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():  # validation under no_grad
            model(torch.randn(7, 8))
        model.eval()  # and in eval mode with autograd on
        model(torch.randn(7, 8)).sum()
        model.train()


def test_a_loop_that_never_reads_the_aux_loss_starts_anew_after_each_backward():
    layer = _layer()
    for _ in range(3):
        x = torch.randn(7, 8)
        layer(x).square().sum().backward()  # no read: the backward closes the sum
    torch.testing.assert_close(layer.aux_loss, _alone(layer, x), rtol=0, atol=0)


def test_reset_forgets_the_sum():
    layer = _layer()
    layer(torch.randn(4, 8))
    layer.reset_aux_loss()
    assert layer.aux_loss.item() == 0.0
    x = torch.randn(4, 8)
    layer(x)
    torch.testing.assert_close(layer.aux_loss, _alone(layer, x), rtol=0, atol=0)
