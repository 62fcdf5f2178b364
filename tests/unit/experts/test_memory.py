"""Activation memory of a dropless layer: at most the dense limit's plus O(T*k*D) (issue 9).

The dense limit is a plain FFN of hidden width k*F (the same active FLOPs); autograd's saved
tensors are counted by storage, parameters and the input left out.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import moesaic as ms
from benchmarks.harness import saved_for_backward_bytes

T, D, FF, E = 256, 128, 256, 8


def _dense(width: int, activation: str, dtype: torch.dtype):
    w1, w2, w3 = (
        nn.Linear(*io, bias=False, dtype=dtype) for io in ((D, width), (width, D), (D, width))
    )

    def ffn(x):
        if activation == "swiglu":
            return w2(F.silu(w1(x)) * w3(x))
        return w2(getattr(F, activation)(w1(x)))

    return ffn, [*w1.parameters(), *w2.parameters(), *w3.parameters()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_saved_activations_within_the_dense_limit_plus_two_token_copies(top_k, activation, dtype):
    layer = ms.MoE(D, FF, E, router="topk", top_k=top_k, activation=activation).to(dtype)
    dense, dense_params = _dense(top_k * FF, activation, dtype)
    x = torch.randn(T, D, dtype=dtype, requires_grad=True)
    moe_bytes = saved_for_backward_bytes(lambda: layer(x), [*layer.parameters(), x])
    dense_bytes = saved_for_backward_bytes(lambda: dense(x), [*dense_params, x])
    token_copies = 2 * T * top_k * D * dtype.itemsize  # the experts' input and output rows
    router = 8 * T * E + 64 * T * top_k  # fp32 probabilities and logits, int64 indices
    assert moe_bytes <= dense_bytes + token_copies + router
    assert moe_bytes > 0.9 * dense_bytes  # the count sees the experts' hidden states
