import pytest

from moesaic.train.config import ConfigError, RunConfig, apply_overrides, parse_value
from moesaic.train.recipes import RECIPES, dense_baseline, get_recipe


def test_overrides_are_parsed_by_field_type():
    cfg = apply_overrides(
        RunConfig(),
        [
            "train.steps=7",
            "optim.lr=0.01",
            "model.tie_embeddings=false",
            "model.capacity_factor=1.25",
            "model.router=gshard",
            "model.top_k=2",
            "model.num_experts=4",
            'model.router_options={"normalize": true}',
            "data.corpus=kjv",
        ],
    )
    assert cfg.train.steps == 7 and cfg.optim.lr == 0.01 and cfg.model.tie_embeddings is False
    assert cfg.model.capacity_factor == 1.25 and cfg.model.router_options == {"normalize": True}
    assert apply_overrides(cfg, ["model.capacity_factor=none"]).model.capacity_factor is None


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
        ("model.router_options=[1]", "expected dict"),
        ("train.steps=0", "train.steps=0 must be >= 1"),
        ("model.num_experts=6", "divisible by parallel.expert=4"),
        ("data.seq_len=1000", "data.seq_len=1000 must be <= model.max_seq_len"),
        ("data.corpus=wiki", "data.corpus='wiki' is not one of"),
    ],
)
def test_bad_overrides_raise_one_config_error_naming_the_field(override, message):
    cfg = apply_overrides(RunConfig(), ["parallel.expert=4", "model.num_experts=8"])
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        apply_overrides(cfg, [override])


def test_every_recipe_builds_and_its_dense_baseline_matches_activated_width():
    for name in RECIPES:
        cfg = get_recipe(name)
        dense = dense_baseline(cfg)
        assert dense.model.num_experts == 0
        if cfg.model.is_moe:
            assert dense.model.matched_d_ff == cfg.model.d_ff * cfg.model.top_k
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
