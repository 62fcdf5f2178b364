"""Tensors of the wrong shape, dtype or device into every public module fail with an error that
names the argument, the value and the rule."""

from __future__ import annotations

import pytest
import torch

import moesaic as ms
from moesaic.context import current_context
from moesaic.inference.generate import generate_ids
from moesaic.models.registry import create
from tests.cases import ROUTER_CASES

# (what, builder of a bad x for d_model=8, error, message)
BAD_TOKENS = [
    (
        "shape",
        lambda: torch.randn(3, 7),
        ValueError,
        r"\.shape=\(3, 7\) must be \(tokens, d_model=8\)",
    ),
    ("rank", lambda: torch.randn(2, 3, 8), ValueError, r"\.shape=\(2, 3, 8\) must be \(tokens"),
    ("dtype", lambda: torch.ones(3, 8, dtype=torch.long), TypeError, r"\.dtype=torch.int64 must"),
    ("device", lambda: torch.randn(3, 8, device="meta"), ValueError, r"\.device=meta must match"),
    ("type", lambda: [[0.0] * 8], TypeError, " must be a torch.Tensor, got list"),
]


def _holds_tensors(case) -> bool:
    return next(case.layer(d_model=8).router.parameters(), None) is not None


# A router without parameters (hash, skill, cluster) works on whatever device x is on.
ROUTER_BAD = [
    pytest.param(case, *bad, id=f"{case.id}-{bad[0]}")
    for case in ROUTER_CASES
    for bad in BAD_TOKENS
    if bad[0] != "device" or _holds_tensors(case)
]


@pytest.mark.parametrize("case,what,bad,error,match", ROUTER_BAD)
def test_every_router_rejects_bad_tokens(case, what, bad, error, match):
    router = case.layer(d_model=8).router
    with case.context(3), pytest.raises(error, match="x_TD" + match):
        router(bad(), current_context())


@pytest.mark.parametrize("what,bad,error,match", BAD_TOKENS, ids=[b[0] for b in BAD_TOKENS])
def test_experts_reject_bad_tokens(what, bad, error, match):
    experts = ms.Experts(4, 8, 16)
    with pytest.raises(error, match="x_AD" + match):
        experts(bad(), [3, 0, 0, 0])


@pytest.mark.parametrize(
    "counts,match",
    [
        ([3, 0, 0], r"counts=\[3, 0, 0\] must be 4 ints >= 0"),
        ([4, -1, 0, 0], "must be 4 ints >= 0"),
        ([1.5, 1.5, 0, 0], "must be 4 ints >= 0"),
        ([1, 1, 0, 0], r"sum\(counts\)=2 must equal x_AD.shape\[0\]=3"),
    ],
)
def test_experts_reject_counts_that_do_not_describe_the_rows(counts, match):
    with pytest.raises(ValueError, match=match):
        ms.Experts(4, 8, 16)(torch.randn(3, 8), counts)


def test_the_moe_layer_rejects_a_tensor_on_another_device():
    with pytest.raises(ValueError, match="x.device=meta must match the layer's device cpu"):
        ms.MoE(8, 16, 4)(torch.randn(2, 8, device="meta"))


@pytest.mark.parametrize(
    "idx,targets,error,match",
    [
        (torch.zeros(2, 4, dtype=torch.long, device="meta"), None, ValueError, "idx.device=meta"),
        (torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 3), ValueError, "targets.shape="),
        (torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4), TypeError, "targets.dtype="),
        (torch.zeros(2, 4, dtype=torch.long), [1, 2], ValueError, r"targets.shape=\[1, 2\]"),
    ],
)
def test_the_language_model_rejects_bad_ids_and_targets(idx, targets, error, match):
    model = create("lm-moe-test")
    with pytest.raises(error, match=match):
        model(idx) if targets is None else model.loss(idx, targets)


@pytest.mark.parametrize(
    "request_,match",
    [
        ({"prompt": []}, "prompt is empty"),
        ({"prompt": list(range(40)), "max_new_tokens": 0}, "exceeds the model's max_seq_len=32"),
        ({"prompt": [300]}, r"token ids must be in \[0, vocab_size=256\)"),
        ({"max_new_tokens": -1}, "max_new_tokens=-1 must be an int >= 0"),
        ({"temperature": -0.1}, "temperature=-0.1 must be a number >= 0"),
        ({"temperature": float("nan")}, "temperature=nan"),
        ({"top_k": -1}, "top_k=-1 must be an int >= 1"),
        ({"top_p": 0.0}, r"top_p=0.0 must be a number in \(0, 1\]"),
        ({"top_p": 1.01}, r"top_p=1.01 must be"),
        ({"top_p": True}, "top_p=True must be"),
    ],
)
def test_generation_refuses_bad_requests_naming_the_value(request_, match):
    args = {"prompt": [1, 2], "max_new_tokens": 2, **request_}
    with pytest.raises(ValueError, match=match):
        generate_ids(create("lm-moe-test"), args.pop("prompt"), args.pop("max_new_tokens"), **args)


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    # probabilities [0.5, 0.3, 0.15, 0.05]: top_p=0.7 keeps the first two (0.5 < 0.7 <= 0.8)
    from moesaic.inference.generate import _sample

    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    gen = torch.Generator().manual_seed(0)
    drawn = {_sample(logits, 1.0, None, 0.7, gen) for _ in range(300)}
    assert drawn == {0, 1}
    assert {_sample(logits, 1.0, None, 0.5, gen) for _ in range(50)} == {0}
    assert {_sample(logits, 1.0, None, 1.0, gen) for _ in range(300)} == {0, 1, 2, 3}
