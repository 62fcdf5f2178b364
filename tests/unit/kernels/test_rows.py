"""The CPU backend's forward-only ``run(..., rows=...)``: each expert gathers its own input rows
``x[rows]``.

Checked against the per-token reference (experts/reference.py) on both worker modes and both
product paths, and that the MoE layer's forward-only calls never copy all A rows up front.
"""

from __future__ import annotations

import pytest
import torch

import moesaic as ms
from moesaic import layer as layer_module
from moesaic.experts.reference import reference_ffn
from moesaic.kernels.cpu import ffn as sliced
from tests.cases import expert_backend

COUNTS = [3, 0, 6, 5]  # one empty expert; 14 rows of a 9-token input, some tokens twice


def _reference(experts: ms.Experts, x_ND: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    owner = torch.repeat_interleave(torch.arange(len(COUNTS)), torch.tensor(COUNTS)).tolist()
    return torch.stack([reference_ffn(x_ND[r], experts, e) for r, e in zip(rows.tolist(), owner)])


def _rows() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randint(0, 9, (sum(COUNTS),))


@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
@pytest.mark.parametrize("gemm", ["torch", "onednn"])
@pytest.mark.parametrize("impl", ["loop", "threads"])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_forward_only_rows_equal_the_reference(activation, impl, gemm, mode):
    backend = expert_backend(impl, gemm)  # "threads": worker threads whatever the size rule
    experts = ms.Experts(4, 16, 32, activation, bias=True, backend=backend)
    x, rows = torch.randn(9, 16), _rows()
    ctx = torch.inference_mode() if mode == "inference_mode" else torch.no_grad()
    with ctx:
        got = backend.run(experts, x, COUNTS, rows=rows)
        want = _reference(experts, x, rows)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["loop", "threads"])
def test_forward_only_rows_are_gathered_per_expert(impl, monkeypatch):
    """On the expert loop each expert gathers its own rows: no (A, D) input copy is made."""
    gathered: list[int] = []
    original = sliced._forward

    def spy(x_AD, *args, **kwargs):
        gathered.append(x_AD.shape[0])
        return original(x_AD, *args, **kwargs)

    monkeypatch.setattr(sliced, "_forward", spy)
    backend = expert_backend(impl)
    experts = ms.Experts(4, 16, 32, backend=backend)
    x, rows = torch.randn(9, 16), _rows()
    with torch.inference_mode():
        backend.run(experts, x, COUNTS, rows=rows)
    assert gathered == [9]  # the loop saw the 9 tokens, not the 14 gathered rows


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_forward_only_layer_never_permutes(capacity_factor, monkeypatch):
    """The layer's forward-only calls hand the tokens and the plan's rows to the experts."""
    calls: list[int] = []
    monkeypatch.setattr(layer_module, "permute", lambda *a: calls.append(1))
    layer = ms.MoE(16, 32, 4, router="topk", top_k=2, capacity_factor=capacity_factor)
    x = torch.randn(50, 16)
    with torch.inference_mode():
        layer(x)
    assert calls == []
