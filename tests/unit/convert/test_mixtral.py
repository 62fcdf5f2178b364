"""Mixtral interop: our export loads in transformers with equal logits, a transformers Mixtral
imports with equal logits, and export -> import is the identity."""

import dataclasses

import pytest
import torch
import transformers

from moesaic.convert.mixtral import export_mixtral, import_mixtral
from moesaic.models.lm import LMConfig, MoELM

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
    num_experts=4,
    moe_every=1,
    top_k=2,
    router="topk",
)


def _ours(cfg: LMConfig) -> MoELM:
    model = MoELM(cfg).eval()
    with torch.no_grad():  # norms away from 1 so a wrong mapping would show
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("tie, top_k", [(False, 2), (True, 1)])
def test_exported_model_loads_in_transformers_with_equal_logits(tmp_path, tie, top_k):
    model = _ours(dataclasses.replace(MIXTRAL_LIKE, tie_embeddings=tie, top_k=top_k))
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
    model = MoELM(LMConfig(d_model=16, n_layers=2, n_heads=2, d_ff=32, num_experts=2))
    with pytest.raises(ValueError) as err:
        export_mixtral(model, tmp_path)
    for field in ("norm='layernorm'", "activation='gelu'", "moe_every=2", "router='switch'"):
        assert f"model.{field}" in str(err.value)
    assert not (tmp_path / "config.json").exists()


def test_import_refuses_grouped_query_attention_by_name():
    config = transformers.MixtralConfig(
        vocab_size=60,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=2,
    )
    with pytest.raises(ValueError, match="num_key_value_heads=2 must be 4"):
        import_mixtral(transformers.MixtralForCausalLM(config))
