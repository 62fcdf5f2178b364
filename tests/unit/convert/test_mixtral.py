"""Mixtral interop: our export loads in transformers with equal logits, a transformers Mixtral
imports with equal logits, and export -> import is the identity."""

import dataclasses
import json

import pytest
import torch
import transformers

from moesaic.config import MoEConfig
from moesaic.convert.mixtral import export_mixtral, import_mixtral, lm_config_from_mixtral
from moesaic.inference.generate import generate_ids
from moesaic.models.lm import LMConfig, MoELM
from tests.unit.convert.hf_checks import check_aux_coefficient

MIXTRAL_LIKE = LMConfig(
    vocab_size=50,
    max_seq_len=32,
    d_model=32,
    n_layers=2,
    n_heads=4,
    d_ff=48,
    activation="swiglu",
    norm="rmsnorm",
    rope_theta=500.0,
    moe=MoEConfig(num_experts=4, top_k=2, router="topk"),
    moe_every=1,
)


def _with_moe(cfg: LMConfig, **moe) -> LMConfig:
    return dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, **moe))


def _ours(cfg: LMConfig) -> MoELM:
    model = MoELM(cfg).eval()
    with torch.no_grad():  # norms away from 1 so a wrong mapping would show
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("tie, top_k", [(False, 2), (True, 1)])
def test_exported_model_loads_in_transformers_with_equal_logits(tmp_path, tie, top_k):
    model = _ours(_with_moe(dataclasses.replace(MIXTRAL_LIKE, tie_embeddings=tie), top_k=top_k))
    export_mixtral(model, tmp_path)
    hf = transformers.MixtralForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 50, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), atol=1e-4, rtol=0)
    back = import_mixtral(tmp_path)  # and the round trip is exact
    for name, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], value), name


def test_a_transformers_mixtral_imports_with_equal_logits_from_memory_and_from_disk(tmp_path):
    config = transformers.MixtralConfig(
        vocab_size=60,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        rope_theta=1000.0,
    )
    hf = transformers.MixtralForCausalLM(config).eval()
    ids = torch.randint(0, 60, (3, 24))
    with torch.no_grad():
        want = hf(ids).logits
        torch.testing.assert_close(import_mixtral(hf)(ids), want, atol=1e-4, rtol=0)
        hf.save_pretrained(tmp_path)
        torch.testing.assert_close(import_mixtral(tmp_path)(ids), want, atol=1e-4, rtol=0)


def test_export_names_every_field_mixtral_cannot_represent(tmp_path):
    moe = MoEConfig(num_experts=2, shared_d_ff=8)
    model = MoELM(LMConfig(d_model=16, n_layers=2, n_heads=2, d_ff=32, moe=moe, qkv_bias=True))
    with pytest.raises(ValueError) as err:
        export_mixtral(model, tmp_path)
    wrong = ("norm='layernorm'", "activation='gelu'", "moe_every=2", "moe.router='switch'")
    for field in (*wrong, "moe.shared_d_ff=8", "qkv_bias=True"):
        assert f"model.{field}" in str(err.value)
    assert not (tmp_path / "config.json").exists()


def test_import_refuses_key_value_heads_that_do_not_divide_the_heads_by_name():
    config = {
        "vocab_size": 60,
        "hidden_size": 32,
        "intermediate_size": 40,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 3,
        "num_local_experts": 2,
        "num_experts_per_tok": 2,
    }
    with pytest.raises(ValueError, match="num_key_value_heads=3 must divide num_attention_heads=4"):
        lm_config_from_mixtral(config)


def test_grouped_query_attention_exports_and_imports_with_equal_logits_and_greedy_text(tmp_path):
    model = _ours(dataclasses.replace(MIXTRAL_LIKE, n_heads=4, n_kv_heads=2))
    assert model.blocks[0].attn.qkv.weight.shape == (32 + 2 * 16, 32)  # H*hd + 2*Hkv*hd rows
    export_mixtral(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["num_key_value_heads"] == 2
    hf = transformers.MixtralForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 50, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), atol=1e-4, rtol=0)
        greedy = hf.generate(ids[:1, :5], max_new_tokens=12, do_sample=False, pad_token_id=0)
    ours = generate_ids(model, ids[0, :5].tolist(), 12, temperature=0.0)
    assert greedy[0, 5:].tolist() == ours
    back = import_mixtral(tmp_path)
    assert back.cfg.n_kv_heads == 2
    for name, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], value), name


def test_a_published_style_gqa_mixtral_imports_with_equal_logits():
    config = transformers.MixtralConfig(
        vocab_size=60,
        hidden_size=64,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,  # as every released Mixtral (32 / 8)
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    hf = transformers.MixtralForCausalLM(config).eval()
    ids = torch.randint(0, 60, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(import_mixtral(hf)(ids), hf(ids).logits, atol=1e-4, rtol=0)


def test_the_aux_coefficient_keeps_the_balancing_loss_equal_to_transformers(tmp_path):
    """At uniform router probabilities (zero gate weights) transformers' load-balancing loss
    times the exported coefficient equals ours, for k = 1 and 2 and two MoE layers."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    for top_k in (1, 2):
        model = _ours(_with_moe(MIXTRAL_LIKE, top_k=top_k, aux_loss_weight=0.02))
        hf_class = transformers.MixtralForCausalLM
        loss = load_balancing_loss_func
        coef = check_aux_coefficient(
            model, export_mixtral, import_mixtral, hf_class, loss, tmp_path / str(top_k)
        )
        assert coef == pytest.approx(0.02 * 2 / top_k)


def test_the_mixtral_recipe_exports(tmp_path):
    from moesaic.models.registry import create

    model = create("lm-mixtral-tiny").eval()
    assert model.cfg.n_kv_heads == 2
    path = export_mixtral(model, tmp_path)
    hf = transformers.MixtralForCausalLM.from_pretrained(path).eval()
    ids = torch.randint(0, 256, (1, 24))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), atol=1e-4, rtol=0)
