"""Per-block activation checkpointing of the MoE language model: the step equals the stored
one (same loss, same gradients, the same routing under noise, dropout and routing contexts),
and the recomputed forwards count no aux loss, statistics or balance counts a second time."""

from __future__ import annotations

import copy

import pytest
import torch

import moesaic as ms
from benchmarks.harness import saved_for_backward_bytes
from moesaic.models.lm import LMConfig, MoELM

ROUTERS = {
    "switch": {"router": "switch", "top_k": 1},  # jitter noise in training
    "noisy_topk": {"router": "noisy_topk", "top_k": 2},  # Gaussian noise on the logits
    "hash": {"router": "hash", "top_k": 1},  # reads the token ids from the routing context
    "task": {"router": "task", "top_k": 1, "router_options": {"num_tasks": 3}},
    "auxfree": {"router": "topk", "top_k": 2, "router_options": {"balance_rate": 1e-3}},
    "capacity": {"router": "topk", "top_k": 2, "capacity_factor": 1.0},  # drops
}


def _model(options: dict) -> MoELM:
    torch.manual_seed(0)
    moe = ms.MoEConfig(num_experts=4, capacity_factor=options.get("capacity_factor"),
                       **{k: v for k, v in options.items() if k != "capacity_factor"})  # fmt: skip
    cfg = LMConfig(d_model=32, n_layers=3, n_heads=2, d_ff=64, dropout=0.1, moe=moe, moe_every=1)
    return MoELM(cfg).train()


def _step(model: MoELM, ids: torch.Tensor, task: torch.Tensor):
    """One training step's loss, aux loss, gradients and what the MoE layers kept."""
    torch.manual_seed(1)  # noise and dropout draw the same numbers in both models
    with ms.routing_context(task=task):
        task_loss = model.loss(ids[:, :-1], ids[:, 1:])
        aux = ms.aux_loss(model)
    layers = [b.ffn for b in model.blocks]
    kept = [(layer._last.aux_loss, layer.last_stats) for layer in layers]
    (task_loss + aux).backward()
    return {
        # the backward pass (and any recomputation in it) left the forward's records alone
        "untouched": all(
            layer._last.aux_loss is a and layer.last_stats is s
            for layer, (a, s) in zip(layers, kept)
        ),
        "loss": task_loss.item(),
        "aux": aux.item(),
        "aux_after": ms.aux_loss(model).item(),
        "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
        "tokens": [layer.last_stats.tokens_per_expert.clone() for layer in layers],
        "balance": [
            None if layer.router.balance_counts is None else layer.router.balance_counts.clone()
            for layer in layers
            if hasattr(layer.router, "balance_counts")
        ],
    }


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_a_checkpointed_step_equals_the_stored_one(name):
    plain = _model(ROUTERS[name])
    ckpt = copy.deepcopy(plain)
    ckpt.checkpoint_activations = True
    ids = torch.randint(0, 256, (4, 17), generator=torch.Generator().manual_seed(2))
    task = torch.tensor([0, 2, 1, 2])
    want, got = _step(plain, ids, task), _step(ckpt, ids, task)
    assert got["loss"] == want["loss"] and got["aux"] == want["aux"]
    # reading the aux loss after backward gives the step's own sum, not a recomputed one
    assert got["aux_after"] == want["aux_after"] == want["aux"]
    assert got["untouched"] and want["untouched"]
    assert got["grads"].keys() == want["grads"].keys()
    for key, grad in want["grads"].items():
        torch.testing.assert_close(got["grads"][key], grad, rtol=1e-5, atol=1e-7, msg=key)
    for a, b in zip(got["tokens"], want["tokens"]):
        assert torch.equal(a, b)
    for a, b in zip(got["balance"], want["balance"]):  # counted once per forward, not twice
        assert (a is None and b is None) or torch.equal(a, b)
    if name == "auxfree":
        assert sum(int(b.sum()) for b in got["balance"]) == 3 * 4 * 16 * 2  # layers*B*S*k


def _saved_bytes(model: MoELM, ids: torch.Tensor) -> int:
    return saved_for_backward_bytes(
        lambda: model.loss(ids[:, :-1], ids[:, 1:]), list(model.parameters())
    )


def test_checkpointing_keeps_far_fewer_activations():
    plain = _model(ROUTERS["switch"])
    ids = torch.randint(0, 256, (8, 65), generator=torch.Generator().manual_seed(3))
    stored = _saved_bytes(plain, ids)
    plain.checkpoint_activations = True
    kept = _saved_bytes(plain, ids)
    assert kept < 0.5 * stored, (kept, stored)
    plain.eval()  # evaluation and generation never checkpoint
    with torch.no_grad():
        assert torch.equal(plain(ids), _model(ROUTERS["switch"]).eval()(ids))


def test_checkpointing_refuses_routing_record_and_replay():
    model = _model(ROUTERS["switch"])
    model.checkpoint_activations = True
    ids = torch.randint(0, 256, (2, 9))
    with ms.record_routing(), pytest.raises(RuntimeError, match="cannot run under ms.record"):
        model.loss(ids[:, :-1], ids[:, 1:])
