"""LMConfig's norm / rope_theta / qkv_bias options (added for Mixtral and Qwen2-MoE interop;
defaults unchanged)."""

import pytest
import torch
from torch import nn

from moesaic.models.lm import LMConfig, MoELM

SMALL = {"vocab_size": 20, "max_seq_len": 8, "d_model": 16, "n_layers": 1, "n_heads": 2, "d_ff": 8}


def test_defaults_are_layernorm_and_base_10000():
    model = MoELM(LMConfig(**SMALL))
    assert isinstance(model.ln_f, nn.LayerNorm) and model.cfg.rope_theta == 10000.0


def test_rmsnorm_option_normalises_by_the_root_mean_square():
    model = MoELM(LMConfig(**SMALL, norm="rmsnorm", norm_eps=1e-6))
    x = torch.randn(3, 16)
    want = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)  # weight starts at one
    torch.testing.assert_close(model.ln_f(x), want)
    assert all(isinstance(b.ln1, nn.RMSNorm) for b in model.blocks)


def test_rope_theta_sets_the_rotation_frequencies():
    model = MoELM(LMConfig(**SMALL, rope_theta=100.0))
    hd = 8
    # position 1, channel pair i turns by 100^(-2i/hd)
    want = torch.cos(100.0 ** (-torch.arange(0, hd, 2).float() / hd))
    torch.testing.assert_close(model.rope_cos[1], want)


def test_qkv_bias_adds_zero_initialised_biases_to_the_attention_projections():
    assert MoELM(LMConfig(**SMALL)).blocks[0].attn.qkv.bias is None  # old checkpoints load as is
    model = MoELM(LMConfig(**SMALL, qkv_bias=True))
    qkv = model.blocks[0].attn.qkv
    assert qkv.bias.shape == (3 * 16,) and not qkv.bias.any()
    with torch.no_grad():
        qkv.bias.normal_()
    x = torch.randn(1, 5, 16)
    torch.testing.assert_close(qkv(x), x @ qkv.weight.t() + qkv.bias)
    idx = torch.randint(0, 20, (1, 6))
    model.loss(idx, idx).backward()
    assert qkv.bias.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "field, value, text",
    [
        ("norm", "batchnorm", "model.norm='batchnorm' is not one of"),
        ("rope_theta", 0.0, "model.rope_theta=0.0 must be > 0"),
        ("norm_eps", -1.0, "model.norm_eps=-1.0 must be a finite float >= 0"),
    ],
)
def test_bad_options_are_rejected_by_name(field, value, text):
    with pytest.raises(ValueError, match=text.replace("(", r"\(").replace(".", r"\.")):
        LMConfig(**SMALL, **{field: value})


def test_hash_routed_lm_hashes_each_token_id_also_when_decoding_with_a_cache():
    from moesaic import MoEConfig
    from moesaic.models.lm import KVCache
    from moesaic.routing.hash import balanced_hash

    cfg = LMConfig(**SMALL, moe_every=1, moe=MoEConfig(num_experts=4, router="hash"))
    model = MoELM(cfg).eval()
    seen = []
    router = model.blocks[0].ffn.router
    router.register_forward_hook(lambda mod, args, out: seen.append(out.expert))
    idx = torch.randint(0, 20, (2, 5))
    model(idx)
    torch.testing.assert_close(seen[-1], balanced_hash(idx.reshape(-1), 4))
    cache = KVCache(cfg.n_layers)
    model(idx[:, :4], cache)
    model(idx[:, 4:], cache)  # one decoding step: the ids of that step only
    torch.testing.assert_close(seen[-1], balanced_hash(idx[:, 4], 4))
