import dataclasses
import json

import pytest
import torch

from moesaic.config import MoEConfig
from moesaic.models.lm import LMConfig, MoELM, migrate_lm_dict
from moesaic.train.config import (
    ConfigError,
    RunConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    parse_value,
)
from moesaic.train.recipes import RECIPES, dense_baseline, get_recipe


def test_overrides_are_parsed_by_field_type():
    cfg = apply_overrides(
        RunConfig(),
        [
            "train.steps=7",
            "optim.lr=0.01",
            "model.tie_embeddings=false",
            "model.moe.capacity_factor=1.25",
            "model.moe.router=topk",
            "model.moe.top_k=2",
            "model.moe.num_experts=4",
            'model.moe.router_options={"normalize": true}',
            "model.moe.router_dtype=float64",
            "data.corpus=kjv",
        ],
    )
    moe = cfg.model.moe
    assert cfg.train.steps == 7 and cfg.optim.lr == 0.01 and cfg.model.tie_embeddings is False
    assert moe.capacity_factor == 1.25 and moe.router_options == {"normalize": True}
    assert moe.router == "topk" and moe.top_k == 2 and moe.router_dtype == torch.float64
    assert (
        apply_overrides(cfg, ["model.moe.capacity_factor=none"]).model.moe.capacity_factor is None
    )


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.nope=1", "unknown key 'nope' in train; valid keys:"),
        ("nope.steps=1", "unknown key 'nope' in the run config"),
        ("train=1", "is a section"),
        ("train.steps.x=1", "train.steps has no fields"),
        ("train.steps", "must look like section.field=value"),
        ("train.steps=1.5", "expected int"),
        ("optim.lr=fast", "expected float"),
        ("model.tie_embeddings=2", "expected bool"),
        ("model.moe.router_options=[1]", "expected dict"),
        ("model.moe.router_dtype=fp33", "expected dtype"),
        ("model.moe=1", "is a section"),
        ("train.steps=0", "train.steps=0 must be >= 1"),
        ("model.moe.num_experts=6", "divisible by parallel.expert=4"),
        ("data.seq_len=1000", "data.seq_len=1000 must be <= model.max_seq_len"),
        ("data.corpus=wiki", "data.corpus='wiki' is not one of"),
    ],
)
def test_bad_overrides_raise_one_config_error_naming_the_field(override, message):
    cfg = apply_overrides(RunConfig(), ["parallel.expert=4", "model.moe.num_experts=8"])
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        apply_overrides(cfg, [override])


def test_every_recipe_builds_and_its_dense_baseline_matches_activated_width():
    for name in RECIPES:
        cfg = get_recipe(name)
        dense = dense_baseline(cfg)
        assert dense.model.moe is None
        if cfg.model.is_moe:
            k, moe = cfg.model.moe.experts_per_token, cfg.model.moe
            assert dense.model.matched_d_ff == cfg.model.expert_width * k + moe.shared_d_ff
        assert dense.data == cfg.data and dense.optim == cfg.optim and dense.train == cfg.train
    with pytest.raises(ValueError, match="recipe 'x' is not one of"):
        get_recipe("x")


def test_parse_value_handles_optional_and_rejects_unsupported_types():
    assert parse_value("a", "None", float | None) is None
    assert parse_value("a", "2", float | None) == 2.0
    with pytest.raises(ConfigError, match="cannot be set"):
        parse_value("a", "1", list)


def test_building_and_checking_a_config_leaves_the_global_rng_alone():
    # the model's initial weights come from the global RNG right after the config is built
    import torch

    torch.manual_seed(123)
    want = torch.rand(3)
    torch.manual_seed(123)
    for name in RECIPES:
        apply_overrides(get_recipe(name), ["train.steps=7"])
    assert torch.equal(torch.rand(3), want)


# The model section of a config.json written before the MoE options moved into model.moe.
OLD_MODEL = {
    "vocab_size": 256,
    "max_seq_len": 32,
    "d_model": 32,
    "n_layers": 2,
    "n_heads": 2,
    "n_kv_heads": None,
    "d_ff": 64,
    "activation": "gelu",
    "positions": "rope",
    "rope_theta": 10000.0,
    "norm": "layernorm",
    "norm_eps": 1e-05,
    "tie_embeddings": True,
    "dropout": 0.0,
    "num_experts": 4,
    "moe_every": 2,
    "top_k": 1,
    "router": "switch",
    "capacity_factor": None,
    "drop_policy": "position",
    "aux_loss_weight": 0.01,
    "z_loss_weight": 0.0,
    "router_options": {},
    "matched_d_ff": None,
}


def test_an_old_flat_model_config_migrates_into_model_moe():
    old = {**config_to_dict(get_recipe("lm-moe-test")), "model": OLD_MODEL}
    cfg = config_from_dict(RunConfig, old)
    assert cfg == get_recipe("lm-moe-test")
    assert cfg.model.moe == MoEConfig(num_experts=4, top_k=1, router="switch")
    torch.manual_seed(0)
    a = MoELM(cfg.model).state_dict()
    torch.manual_seed(0)
    b = MoELM(get_recipe("lm-moe-test").model).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    dense = migrate_lm_dict({**OLD_MODEL, "num_experts": 0, "matched_d_ff": 64})
    assert dense["moe"] is None and "top_k" not in dense and "router" not in dense
    assert config_from_dict(LMConfig, dense) == LMConfig(**{**lm_fields(), "matched_d_ff": 64})
    assert migrate_lm_dict(config_to_dict(cfg.model)) == config_to_dict(cfg.model)


def lm_fields():
    return {
        k: v for k, v in OLD_MODEL.items() if k in {f.name for f in dataclasses.fields(LMConfig)}
    }


def test_every_moe_option_is_reachable_with_set_model_moe():
    cfg = apply_overrides(
        get_recipe("lm-moe-test"),
        [
            "model.moe.shared_d_ff=16",
            "model.moe.jitter=0.05",
            "model.moe.expert_bias=true",
            "model.moe.expert_backend=torch",
            "model.moe.z_loss_weight=0.001",
        ],
    )
    layer = MoELM(cfg.model).blocks[1].ffn
    assert layer.shared.d_ff == 16 and layer.router.jitter == 0.05
    assert layer.experts.b1 is not None and layer.experts.backend == "torch"
    assert layer.z_loss_weight == 0.001 and layer.config == cfg.model.moe_config()
    saved = json.loads(json.dumps(config_to_dict(cfg)))  # what config.json holds
    assert config_from_dict(RunConfig, saved) == cfg


def test_moe_none_makes_a_dense_model_and_setting_a_field_starts_one():
    dense = apply_overrides(get_recipe("lm-moe-test"), ["model.moe=none", "recipe=x"])
    assert dense.model.moe is None and not dense.model.is_moe
    back = apply_overrides(dense, ["model.moe.num_experts=8"])
    assert back.model.moe == MoEConfig(num_experts=8)
    with pytest.raises(ConfigError, match="model.moe: MoEConfig.__init__.. missing .*num_experts"):
        apply_overrides(dense, ["model.moe.top_k=1"])


@pytest.mark.parametrize("key", ["num_experts", "top_k", "router", "router_options"])
def test_an_old_flat_override_names_its_new_key(key):
    with pytest.raises(ConfigError, match=f"--set model.{key}: moved to model.moe.{key}: use"):
        apply_overrides(get_recipe("lm-moe-test"), [f"model.{key}=1"])
