"""Expert offloading: outputs bit-identical to the resident model, only routed experts read,
the budget held, and bad budgets refused before any work."""

import copy

import pytest
import torch

import moesaic as ms
from moesaic.inference import offload
from moesaic.inference.offload import OffloadedExperts, expert_nbytes
from moesaic.models.lm import KVCache, LMConfig, MoELM

E = 8


def _model(activation="gelu", bias=False):
    cfg = LMConfig(
        vocab_size=64,
        max_seq_len=32,
        d_model=16,
        n_layers=3,
        n_heads=2,
        d_ff=24,
        activation=activation,
        # "torch": the plain loop the offloaded experts compute exactly as
        moe=ms.MoEConfig(num_experts=E, top_k=2, router="topk", expert_backend="torch"),
        moe_every=1,
    )
    model = MoELM(cfg).eval()
    if bias:  # as moefy gives upcycled layers with biases
        for block in model.blocks:
            block.ffn = ms.MoE(
                d_model=16,
                d_ff=24,
                num_experts=E,
                top_k=2,
                router="topk",
                activation=activation,
                expert_bias=True,
                expert_backend="torch",
            ).eval()
    return model


@torch.no_grad()
def _decode(model, idx, steps=4):
    """Logits of a prompt and ``steps`` greedy steps with the KV cache."""
    cache = KVCache(model.cfg.n_layers)
    out = [model(idx, cache)]
    for _ in range(steps):
        out.append(model(out[-1][:, -1:].argmax(-1), cache))
    return out


@pytest.mark.parametrize("experts_budget", [1, 3, 3 * E])
@pytest.mark.parametrize("kw", [{}, {"activation": "swiglu", "bias": True}], ids=str)
def test_offloaded_decoding_is_bit_identical_to_the_resident_model(tmp_path, experts_budget, kw):
    resident = _model(**kw)
    idx = torch.randint(0, 64, (3, 6))
    want = _decode(resident, idx)
    model = copy.deepcopy(resident)
    one = expert_nbytes(model.blocks[0].ffn.experts)
    cache = offload(model, budget_bytes=experts_budget * one, store=tmp_path)
    try:
        got = _decode(model, idx)
    finally:
        cache.close()
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert cache.stats.peak_bytes <= experts_budget * one
    if experts_budget == 1:  # room for one expert: every needed expert is read, each step
        assert cache.stats.evictions > 0 and cache.stats.reads >= cache.stats.misses > 0
    if experts_budget == 3:  # evicted buffers are refilled, never while a layer still uses them
        assert cache.stats.reused > 0
    if experts_budget == 3 * E:  # everything fits: each expert read at most once
        assert cache.stats.reads <= 3 * E and cache.stats.evictions == 0
    assert not any(p.numel() for b in model.blocks for p in b.ffn.experts.parameters())


def test_experts_that_get_no_token_are_never_read(tmp_path):
    layer = ms.MoE(d_model=8, d_ff=16, num_experts=E, router="topk", expert_backend="torch")
    x_AD = torch.randn(5, 8)
    counts = [3, 0, 0, 2, 0, 0, 0, 0]
    want = layer.experts(x_AD, counts)
    cache = offload(layer, budget_bytes=E * expert_nbytes(layer.experts), store=tmp_path)
    try:
        assert isinstance(layer.experts, OffloadedExperts)
        torch.testing.assert_close(layer.experts(x_AD, counts), want, rtol=0, atol=0)
    finally:
        cache.close()
    assert sorted(cache.resident) == [(0, 0), (0, 3)] and cache.stats.reads == 2


def test_prefetch_guesses_the_next_layer_from_the_previous_step(tmp_path):
    model = _model()
    cache = offload(model, budget_bytes=10**9, store=tmp_path)
    idx = torch.randint(0, 64, (2, 5))
    try:
        with torch.no_grad():
            model(idx)
            assert cache.stats.prefetch_needed == 0  # no previous step: no guess yet
            model(idx)  # the same tokens route the same: every guess right
    finally:
        cache.close()
    assert cache.stats.prefetch_needed > 0 and cache.stats.prefetch_rate == 1.0


@pytest.mark.parametrize(
    "budget,message",
    [
        (-5, "budget_bytes=-5 must be an int > 0"),
        (1.5e9, "budget_bytes=1500000000.0 must be an int > 0"),
        (
            100,
            "budget_bytes=100 is smaller than one expert of blocks.0 (3,072 bytes)",
        ),
    ],
)
def test_a_bad_budget_fails_with_one_line_before_writing_anything(tmp_path, budget, message):
    with pytest.raises(ValueError) as err:
        offload(_model(), budget_bytes=budget, store=tmp_path / "store")
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("kw", [{}, {"activation": "swiglu", "bias": True}], ids=str)
def test_offloaded_experts_on_the_cpu_backend_equal_the_resident_model(tmp_path, kw):
    resident = _model(**kw)
    for block in resident.blocks:  # the default backend: the tuned CPU kernels where present
        block.ffn.experts.backend = "auto"
    idx = torch.randint(0, 64, (3, 6))
    want = _decode(resident, idx)
    model = copy.deepcopy(resident)
    cache = offload(
        model, budget_bytes=2 * expert_nbytes(model.blocks[0].ffn.experts), store=tmp_path
    )
    try:
        got = _decode(model, idx)
    finally:
        cache.close()
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw", [{}, {"activation": "swiglu", "bias": True}], ids=str)
def test_experts_that_fit_run_in_one_cpu_backend_call_bit_identical_to_resident(
    tmp_path, kw, monkeypatch
):
    from moesaic.kernels.cpu import CpuBackend

    resident = _model(**kw)
    for block in resident.blocks:
        block.ffn.experts.backend = CpuBackend()
    idx = torch.randint(0, 64, (3, 6))
    want = _decode(resident, idx)
    model = copy.deepcopy(resident)
    cache = offload(model, budget_bytes=10**9, store=tmp_path)
    calls = []
    fused = CpuBackend.forward_combined
    monkeypatch.setattr(
        CpuBackend, "forward_combined", lambda self, *a: calls.append(1) or fused(self, *a)
    )
    try:
        got = _decode(model, idx)
    finally:
        cache.close()
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert len(calls) == 5 * 3  # one call per MoE layer (3) and forward (prompt + 4 steps)


def test_eviction_keeps_the_experts_of_the_layers_that_run_soonest(tmp_path):
    model = _model()  # 3 MoE layers, run in the cycle 0, 1, 2, 0, ...
    one = expert_nbytes(model.blocks[0].ffn.experts)
    cache = offload(model, budget_bytes=4 * one, store=tmp_path)
    try:
        for layer in (1, 2, 0):
            cache.begin(layer, [(layer, 0), (layer, 1)])
            cache.get((layer, 0))
            cache.get((layer, 1))
    finally:
        cache.close()
    # Layer 0's reads had to evict two experts: layer 1 runs next, layer 2 after it, so layer
    # 2's go, though layer 1's were read first (least recently used would evict those).
    assert sorted(cache.resident) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert cache.stats.evictions == 2
