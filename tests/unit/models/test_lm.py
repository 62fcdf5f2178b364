import dataclasses

import pytest
import torch

import moesaic as ms
from moesaic.inference.generate import generate_ids
from moesaic.models.lm import LMConfig, MoELM


def _tiny(**kw) -> MoELM:
    return ms.models.create("lm-moe-test", **kw)


def test_moe_layers_sit_every_moe_every_layers():
    model = _tiny(n_layers=6, moe_every=2)
    kinds = [type(b.ffn).__name__ for b in model.blocks]
    assert kinds == ["DenseFFN", "MoE"] * 3
    assert all(type(b.ffn).__name__ == "MoE" for b in _tiny(n_layers=3, moe_every=1).blocks)
    assert all(type(b.ffn).__name__ == "DenseFFN" for b in _tiny(moe=None).blocks)


def test_dense_equivalent_matches_activated_ffn_width_at_the_moe_layers_only():
    moe = ms.MoEConfig(num_experts=8, router="topk", top_k=2)
    cfg = LMConfig(moe=moe, d_ff=256, n_layers=4, moe_every=2)
    dense = MoELM(cfg.dense_equivalent())
    assert [b.ffn.w1.out_features for b in dense.blocks] == [256, 512, 256, 512]
    plain = LMConfig(d_ff=256)
    assert plain.dense_equivalent() == plain


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_forward_shapes_and_causality(positions):
    model = _tiny(positions=positions).eval()
    idx = torch.randint(0, 256, (2, 16))
    logits = model(idx)
    assert logits.shape == (2, 16, 256)
    changed = idx.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 256
    # positions before 10 must not see the change
    torch.testing.assert_close(model(changed)[:, :10], logits[:, :10])
    assert not torch.allclose(model(changed)[:, 10:], logits[:, 10:])


@pytest.mark.parametrize("positions,kv", [("rope", None), ("learned", None), ("rope", 1)])
def test_cached_decoding_equals_full_recompute(positions, kv):
    torch.manual_seed(0)
    topk = ms.MoEConfig(num_experts=4, router="topk", top_k=2)
    model = _tiny(positions=positions, moe=topk, n_kv_heads=kv).eval()
    prompt = [5, 17, 99, 3]
    cached = generate_ids(model, prompt, 12, temperature=0.0)
    full = generate_ids(model, prompt, 12, temperature=0.0, use_cache=False)
    assert cached == full
    # and the logits agree position by position
    ids = torch.tensor([prompt + cached])
    cache = ms.models.KVCache(model.cfg.n_layers)
    step_logits = [model(ids[:, :4], cache)[:, -1]]
    for t in range(4, ids.shape[1] - 1):
        step_logits.append(model(ids[:, t : t + 1], cache)[:, -1])
    full_logits = model(ids[:, :-1])[:, 3:]
    torch.testing.assert_close(torch.stack(step_logits, 1), full_logits, atol=1e-5, rtol=1e-5)


def test_grouped_query_attention_equals_multi_head_attention_with_shared_key_value_heads():
    """The reference: plain multi-head attention whose every query head's key and value
    projections are copies of its group's one."""
    torch.manual_seed(0)
    gqa = _tiny(n_heads=4, n_kv_heads=2, d_model=32).eval()
    mha = _tiny(n_heads=4, d_model=32).eval()
    state = gqa.state_dict()
    hd = 32 // 4
    for i in range(gqa.cfg.n_layers):
        q, k, v = state[f"blocks.{i}.attn.qkv.weight"].split([32, 2 * hd, 2 * hd])

        def widen(w):  # (Hkv * hd, D) -> (H * hd, D): each kv head serves 2 query heads
            return w.view(2, hd, 32).repeat_interleave(2, dim=0).reshape(4 * hd, 32)

        state[f"blocks.{i}.attn.qkv.weight"] = torch.cat([q, widen(k), widen(v)])
    mha.load_state_dict(state)
    idx = torch.randint(0, 256, (2, 20))
    torch.testing.assert_close(gqa(idx), mha(idx), atol=1e-5, rtol=1e-5)
    assert sum(p.numel() for p in gqa.parameters()) < sum(p.numel() for p in mha.parameters())


def test_sampling_is_deterministic_under_a_seed_and_varies_across_seeds():
    model = _tiny().eval()
    a = generate_ids(model, [1, 2, 3], 20, temperature=1.0, seed=7)
    b = generate_ids(model, [1, 2, 3], 20, temperature=1.0, seed=7)
    c = generate_ids(model, [1, 2, 3], 20, temperature=1.0, seed=8)
    assert a == b and a != c


def test_tied_embeddings_share_one_tensor():
    model = _tiny()
    assert model.head.weight is model.embed.weight
    assert _tiny(tie_embeddings=False).head.weight is not _tiny().embed.weight


def test_a_few_steps_reduce_the_loss_and_the_aux_loss_reaches_the_router():
    torch.manual_seed(0)
    model = _tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    idx = torch.randint(0, 256, (4, 17))
    first = None
    for _ in range(30):
        loss = model.loss(idx[:, :-1], idx[:, 1:]) + ms.aux_loss(model)
        opt.zero_grad()
        loss.backward()
        first = first if first is not None else loss.item()
        opt.step()
    assert loss.item() < first - 1.0
    assert model.blocks[1].ffn.router.gate.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("d_model", 33, "divisible by model.n_heads"),
        ("positions", "alibi", "model.positions='alibi'"),
        ("dropout", 1.0, "model.dropout=1.0 must be < 1"),
        ("moe", {"num_experts": 4}, "model.moe={'num_experts': 4} must be an ms.MoEConfig"),
    ],
)
def test_bad_configs_name_the_field(field, value, match):
    with pytest.raises((TypeError, ValueError), match=match):
        dataclasses.replace(ms.models.model_config("lm-moe-test"), **{field: value})


def test_the_moe_layers_take_width_and_activation_from_the_model_and_every_option_from_moe():
    moe = ms.MoEConfig(num_experts=4, shared_d_ff=8, jitter=0.05, expert_bias=True, top_k=1)
    cfg = LMConfig(d_model=16, n_heads=2, d_ff=24, activation="swiglu", n_layers=2, moe=moe)
    layer = MoELM(cfg).blocks[1].ffn
    assert layer.config == cfg.moe_config() and cfg.moe.d_model is None
    assert (layer.d_model, layer.experts.d_ff, layer.experts.activation) == (16, 24, "swiglu")
    assert layer.shared.d_ff == 8 and layer.router.jitter == 0.05 and layer.experts.b1 is not None
    # the model's width follows the model: replacing it needs no change to moe
    assert MoELM(dataclasses.replace(cfg, d_ff=32)).blocks[1].ffn.experts.d_ff == 32


@pytest.mark.parametrize(
    "moe,match",
    [
        ({"d_ff": 48}, r"model.moe.d_ff=48 conflicts with model.d_ff=24 \(leave d_ff None"),
        ({"d_model": 8}, "model.moe.d_model=8 conflicts with model.d_model=16"),
        ({"activation": "relu"}, "model.moe.activation='relu' conflicts with model.activation"),
        (
            {"router": ms.ROUTERS["topk"](16, 4)},
            "model.moe.router: a TopKRouter instance; it must be a name",
        ),
    ],
)
def test_a_moe_option_the_model_owns_must_agree_with_it(moe, match):
    with pytest.raises((TypeError, ValueError), match=match):
        LMConfig(d_model=16, n_heads=2, d_ff=24, moe=ms.MoEConfig(num_experts=4, **moe))
    same = ms.MoEConfig(num_experts=4, d_model=16, d_ff=24, activation="gelu")
    assert LMConfig(d_model=16, n_heads=2, d_ff=24, moe=same).moe_config() == same


def test_bad_inputs_are_rejected():
    model = _tiny()
    with pytest.raises(TypeError, match="LongTensor"):
        model(torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"must be \(batch, seq\)"):
        model(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="exceeds model.max_seq_len=32"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, vocab_size=256\)"):
        model(torch.full((1, 4), 300))


def test_registry_lists_models_and_rejects_unknown_names():
    assert {"lm-moe-tiny", "lm-dense-tiny", "lm-moe-test"} <= set(ms.models.MODELS)
    with pytest.raises(ValueError, match="is not one of"):
        ms.models.create("nope")
    with pytest.raises(ValueError, match="unknown field"):
        ms.models.create("lm-moe-test", widht=3)


@pytest.mark.parametrize(
    "bad", [{"prompt": []}, {"temperature": -1.0}, {"top_k": 0}, {"max_new_tokens": 40}]
)
def test_generation_rejects_bad_requests(bad):
    args = {"prompt": [1, 2], "max_new_tokens": 4, "temperature": 1.0, "top_k": None, **bad}
    with pytest.raises(ValueError):
        generate_ids(_tiny(), args.pop("prompt"), args.pop("max_new_tokens"), **args)
