"""Qwen2-MoE interop: a transformers Qwen2-MoE imports with equal logits and greedy text (from
memory, in the fused expert layout, and from disk, in the published per-expert one), our export
loads in transformers with no missing or unexpected keys and equal logits, export -> import is
the identity, the aux coefficient keeps transformers' balancing loss, and what does not map is
refused by name."""

import dataclasses
import json

import pytest
import torch
import transformers

from moesaic.config import MoEConfig
from moesaic.convert import (
    export_qwen2_moe,
    import_qwen2_moe,
    lm_config_from_qwen2_moe,
    qwen2_moe_config,
)
from moesaic.inference.generate import generate_ids
from moesaic.models.lm import LMConfig, MoELM
from moesaic.models.registry import model_config
from tests.unit.convert.hf_checks import check_aux_coefficient

TOL = {"atol": 1e-5, "rtol": 1e-5}  # fp32 throughout

QWEN = {  # a Qwen1.5-MoE in miniature: GQA, q/k/v biases, a shared expert, unnormalised top-k
    "vocab_size": 60,
    "hidden_size": 64,
    "intermediate_size": 96,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 80,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000.0,
}

VARIANTS = {
    "released": {},
    "renormalised": {"norm_topk_prob": True, "tie_word_embeddings": True},
    # layers 1 and 3 sparse, then mlp_only_layers takes layer 1 out: experts in layer 3 only
    # (moe_every=2, first_dense_layers=2), dense layers 96 wide and experts 32 (expert_d_ff)
    "mlp-only": {
        "num_hidden_layers": 4,
        "decoder_sparse_step": 2,
        "mlp_only_layers": [1],
        "num_experts": 4,
    },
    "every-other": {"num_hidden_layers": 4, "decoder_sparse_step": 2, "intermediate_size": 32},
    # DeepSeekMoE's layout: a dense first layer wider than the fine-grained experts
    "first-dense": {"num_hidden_layers": 3, "mlp_only_layers": [0]},
}


def _hf(**fields) -> transformers.Qwen2MoeForCausalLM:
    torch.manual_seed(0)
    model = transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(**QWEN | fields)).eval()
    with torch.no_grad():  # transformers starts biases at 0, norms at 1, routers near uniform
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.1)
            else:
                p.uniform_(0.5, 1.5)
    return model


def _ours(cfg: LMConfig) -> MoELM:
    torch.manual_seed(0)
    model = MoELM(cfg).eval()
    with torch.no_grad():  # biases, norms and the shared-expert gate away from their start
        for name, p in model.named_parameters():
            if p.dim() == 1 or "router" in name or "shared_gate" in name:
                p.normal_(0.0, 0.5)
    return model


TINY = model_config("lm-qwen2moe-tiny")  # GQA, q/k/v biases, gated shared expert, raw top-2
QWEN_LIKE = dataclasses.replace(
    TINY,
    vocab_size=50,
    max_seq_len=32,
    d_model=32,
    d_ff=24,
    rope_theta=500.0,
    moe=dataclasses.replace(TINY.moe, num_experts=4, shared_d_ff=40),
)


def _same_state(a: MoELM, b: MoELM) -> None:
    assert a.state_dict().keys() == b.state_dict().keys()
    for name, value in a.state_dict().items():
        assert torch.equal(b.state_dict()[name], value), name


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_a_transformers_qwen2_moe_imports_with_equal_logits_from_memory_and_from_disk(
    tmp_path, variant
):
    hf = _hf(**VARIANTS[variant])
    ids = torch.randint(0, 60, (3, 24))
    with torch.no_grad():
        want = hf(ids).logits
        ours = import_qwen2_moe(hf)  # the fused gate_up_proj / down_proj layout
        torch.testing.assert_close(ours(ids), want, **TOL)
        hf.save_pretrained(tmp_path)  # the published per-expert layout
        torch.testing.assert_close(import_qwen2_moe(tmp_path)(ids), want, **TOL)
    sparse = [i for i, layer in enumerate(hf.model.layers) if hasattr(layer.mlp, "experts")]
    assert [i for i in range(ours.cfg.n_layers) if ours.cfg.moe_layer(i)] == sparse
    assert ours.cfg.moe.router_options.get("normalize", True) == hf.config.norm_topk_prob
    greedy = hf.generate(ids[:1, :5], max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert generate_ids(ours, ids[0, :5].tolist(), 12, temperature=0.0) == greedy[0, 5:].tolist()


@pytest.mark.parametrize("variant", ["released", "every-other", "first-dense"])
def test_export_writes_the_published_layout_that_transformers_loads_with_equal_logits(
    tmp_path, variant
):
    ours = _ours(lm_config_from_qwen2_moe(QWEN | VARIANTS[variant]))
    export_qwen2_moe(ours, tmp_path)
    hf, info = transformers.Qwen2MoeForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}  # no missing / unexpected / mismatched key
    ids = torch.randint(0, 60, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(ids).logits, ours(ids), **TOL)
    _same_state(ours, import_qwen2_moe(tmp_path))  # the round trip is exact
    assert import_qwen2_moe(tmp_path).cfg == ours.cfg


@pytest.mark.parametrize("normalize, tie", [(False, False), (True, True)])
def test_a_moesaic_model_exports_and_comes_back_unchanged(tmp_path, normalize, tie):
    options = {} if normalize else {"normalize": False}
    moe = dataclasses.replace(QWEN_LIKE.moe, router_options=options)
    model = _ours(dataclasses.replace(QWEN_LIKE, moe=moe, tie_embeddings=tie))
    export_qwen2_moe(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["norm_topk_prob"] is normalize and config["qkv_bias"] is True
    assert config == qwen2_moe_config(model.cfg)
    hf = transformers.Qwen2MoeForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 50, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), **TOL)
    back = import_qwen2_moe(tmp_path)
    _same_state(model, back)
    assert back.cfg == model.cfg


def test_the_aux_coefficient_keeps_the_balancing_loss_equal_to_transformers(tmp_path):
    """At uniform router probabilities (zero gate weights) transformers' load-balancing loss
    times the exported coefficient equals ours, for k = 1 and 2, with two MoE layers of four
    (the coefficient counts the sparse layers, not every layer)."""
    from transformers.models.qwen2_moe.modeling_qwen2_moe import load_balancing_loss_func

    for top_k in (1, 2):
        moe = dataclasses.replace(QWEN_LIKE.moe, top_k=top_k, aux_loss_weight=0.02)
        model = _ours(dataclasses.replace(QWEN_LIKE, moe=moe, n_layers=4, moe_every=2))
        hf_class = transformers.Qwen2MoeForCausalLM
        loss = load_balancing_loss_func
        coef = check_aux_coefficient(
            model, export_qwen2_moe, import_qwen2_moe, hf_class, loss, tmp_path / str(top_k)
        )
        assert coef == pytest.approx(0.02 * 2 / top_k)  # L = 2 sparse layers of 4


def test_export_names_every_field_qwen2_moe_cannot_represent(tmp_path):
    moe = MoEConfig(num_experts=2, router="topk", jitter=0.1, capacity_factor=1.0)
    model = MoELM(LMConfig(d_model=16, n_layers=2, n_heads=2, d_ff=32, moe=moe))
    with pytest.raises(ValueError) as err:
        export_qwen2_moe(model, tmp_path)
    wrong = ("norm='layernorm'", "activation='gelu'", "moe.capacity_factor=1.0", "moe.jitter=0.1")
    for field in (*wrong, "moe.shared_d_ff=0", "moe.shared_gate=False"):
        assert f"model.{field}" in str(err.value)
    assert str(err.value).startswith("cannot export to Qwen2-MoE; incompatible fields:")
    assert not (tmp_path / "config.json").exists()


REFUSED = [
    # layer 0 sparse, layer 1 dense: not every moe_every-th layer
    ({"mlp_only_layers": [1]}, "mlp_only_layers=[1] make layers [0] sparse"),
    # layers 0 and 2 sparse, 1 and 3 dense: sparse layers come every moe_every-th from an offset
    ({"num_hidden_layers": 4, "mlp_only_layers": [1, 3]}, "make layers [0, 2] sparse"),
    (
        {"use_sliding_window": True, "sliding_window": 16},
        "use_sliding_window=True with sliding_window=16 < max_seq_len=64",
    ),
    ({"mlp_only_layers": [0, 1]}, "leave no sparse layer"),
    ({"num_key_value_heads": 3}, "num_key_value_heads=3 must divide num_attention_heads=8"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "rope type='yarn' must be"),
]


@pytest.mark.parametrize("fields, message", REFUSED, ids=[m.split("=")[0] for _, m in REFUSED])
def test_import_refuses_what_moesaic_cannot_represent_by_name(fields, message):
    with pytest.raises(ValueError, match="cannot import this Qwen2-MoE config") as err:
        lm_config_from_qwen2_moe(QWEN | fields)
    assert message in str(err.value)


def test_import_collects_every_refusal_in_one_error():
    bad = QWEN | {"mlp_only_layers": [1], "use_sliding_window": True, "sliding_window": 8}
    with pytest.raises(ValueError) as err:
        lm_config_from_qwen2_moe(bad)
    assert "make layers [0] sparse" in str(err.value) and "sliding_window=8" in str(err.value)


def test_two_ffn_widths_and_leading_dense_layers_map_to_expert_d_ff_and_first_dense_layers():
    cfg = lm_config_from_qwen2_moe(QWEN | VARIANTS["first-dense"])
    assert (cfg.d_ff, cfg.expert_d_ff, cfg.first_dense_layers, cfg.moe_every) == (96, 32, 1, 1)
    cfg = lm_config_from_qwen2_moe(QWEN | VARIANTS["mlp-only"])
    assert (cfg.d_ff, cfg.expert_d_ff, cfg.first_dense_layers, cfg.moe_every) == (96, 32, 2, 2)
    cfg = lm_config_from_qwen2_moe(QWEN)  # every layer sparse: intermediate_size is unused
    assert (cfg.d_ff, cfg.expert_d_ff, cfg.first_dense_layers) == (32, None, 0)


def test_the_qwen2moe_recipe_exports(tmp_path):
    from moesaic.models.registry import create

    model = create("lm-qwen2moe-tiny").eval()
    path = export_qwen2_moe(model, tmp_path)
    hf = transformers.Qwen2MoeForCausalLM.from_pretrained(path).eval()
    ids = torch.randint(0, 256, (1, 24))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), **TOL)
