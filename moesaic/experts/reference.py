"""Slow, obviously correct reference implementations. Used only by tests.

Everything here loops over tokens and assignments in plain Python, shares no code with the fast
path beyond the expert weights, and follows the papers' pseudo-code line by line:

- ``reference_topk``: per token, sort the probabilities and take the first k.
- ``reference_keep``: GShard Algorithm 1 / V-MoE BPR capacity: process every first choice
  (in token order or by priority), then every second choice, ...; an assignment is kept while its
  expert has fewer than C kept assignments.
- ``reference_moe``: ``y[t] = sum_{kept a of t} weight[a] * FFN_{expert[a]}(x[t])``.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from moesaic.routing.base import Routing

__all__ = ["reference_topk", "reference_keep", "reference_ffn", "reference_moe"]


def reference_topk(
    probs_TE: torch.Tensor, k: int, normalize: bool
) -> list[list[tuple[int, float]]]:
    """For each token, its k (expert, weight) pairs, largest probability first."""
    out = []
    for row in probs_TE.tolist():
        ranked = sorted(range(len(row)), key=lambda e: -row[e])[:k]
        total = sum(row[e] for e in ranked) if normalize else 1.0
        out.append([(e, row[e] / total) for e in ranked])
    return out


def reference_keep(
    routing: Routing, num_experts: int, capacity: int | None, policy: str
) -> list[bool]:
    """Which assignments survive capacity ``capacity`` under drop policy ``policy``."""
    token, expert = routing.token.tolist(), routing.expert.tolist()
    choice, weight = routing.choice.tolist(), routing.weight.detach().tolist()
    A = len(token)
    # Batch Prioritized Routing: a token's priority is its largest routing weight.
    priority = {}
    for a in range(A):
        priority[token[a]] = max(priority.get(token[a], -math.inf), weight[a])
    if routing.priority is None:  # expert choice: each assignment is its own priority
        priority_of = weight
    else:
        priority_of = [priority[token[a]] for a in range(A)]
    fill = [0] * num_experts
    keep = [False] * A
    for level in sorted(set(choice)):
        todo = [a for a in range(A) if choice[a] == level]
        if policy == "position":
            todo.sort(key=lambda a: token[a])
        else:
            todo.sort(key=lambda a: (-priority_of[a], token[a]))
        for a in todo:
            if capacity is None or fill[expert[a]] < capacity:
                keep[a] = True
                fill[expert[a]] += 1
    return keep


def reference_ffn(x_D: torch.Tensor, experts, e: int) -> torch.Tensor:
    """Expert e of an ``Experts`` module applied to one token vector (biases when it has them)."""

    def bias(name: str) -> torch.Tensor | float:
        b = getattr(experts, name, None)
        return 0.0 if b is None else b[e]

    h = x_D @ experts.w1[e] + bias("b1")
    if experts.activation == "swiglu":
        h = F.silu(h) * (x_D @ experts.w3[e] + bias("b3"))
    elif experts.activation == "gelu_tanh":
        h = F.gelu(h, approximate="tanh")
    else:
        h = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}[experts.activation](h)
    return h @ experts.w2[e] + bias("b2")


def reference_moe(
    x_TD: torch.Tensor,
    routing: Routing,
    experts,
    capacity: int | None = None,
    policy: str = "position",
) -> torch.Tensor:
    """The MoE output for a given routing, one assignment at a time."""
    keep = reference_keep(routing, experts.num_experts, capacity, policy)
    rows = [torch.zeros(x_TD.shape[1], dtype=x_TD.dtype) for _ in range(x_TD.shape[0])]
    for a, kept in enumerate(keep):
        if kept:
            t, e = int(routing.token[a]), int(routing.expert[a])
            rows[t] = rows[t] + routing.weight[a].to(x_TD.dtype) * reference_ffn(
                x_TD[t], experts, e
            )
    return torch.stack(rows) if rows else x_TD.new_zeros(0, x_TD.shape[1])
