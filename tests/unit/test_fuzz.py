"""Property and fuzz tests: every router in the case table against experts/reference.py under
random capacities; the ``--set`` parser and the checkpoint loader on random input raise only our
own clean errors (one line, naming what was wrong) and never anything else."""

from __future__ import annotations

import hashlib
import json
import math
import string
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from moesaic.experts.reference import reference_keep, reference_moe
from moesaic.models.registry import create
from moesaic.train.checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from moesaic.train.config import ConfigError, RunConfig, apply_overrides
from moesaic.train.recipes import get_recipe
from tests.cases import ROUTER_CASES, capture_routing
from tests.unit.train.test_config_table import BAD, _recipe

FAST = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    case=st.sampled_from(ROUTER_CASES),
    E=st.integers(4, 9),
    T=st.integers(1, 20),
    cf=st.one_of(st.none(), st.floats(0.05, 4.0)),
    policy=st.sampled_from(["position", "priority"]),
    seed=st.integers(0, 999),
)
def test_every_router_and_capacity_matches_the_reference(case, E, T, cf, policy, seed):
    # prototype routing needs E divisible by its k groups (the refusal is tested on its own)
    assume(case.router != "prototype" or E % case.top_k == 0)
    torch.manual_seed(seed)
    layer = case.layer(d_model=6, d_ff=10, num_experts=E, capacity_factor=cf, drop_policy=policy)
    seen = capture_routing(layer)
    x = torch.randn(T, 6)
    with case.context(T):  # one "sequence" per token: task ids 0, 1, 2, 0, ...
        y = layer(x)
    routing, C = seen[-1], layer.capacity(T)
    if cf is not None:  # GShard / Switch: C = ceil(cf * k * T / E) slots per expert
        assert C == math.ceil(cf * layer.top_k * T / E) or case.router == "expert_choice"
    assert bool(((routing.token >= 0) & (routing.token < T)).all())
    assert bool(((routing.expert >= 0) & (routing.expert < E)).all())
    assert bool(torch.isfinite(routing.weight).all()) and bool((routing.weight >= 0).all())
    pairs = list(zip(routing.token.tolist(), routing.expert.tolist()))
    assert len(set(pairs)) == len(pairs), "a token reaches an expert at most once"
    kept = reference_keep(routing, E, C, policy)
    per_expert = torch.bincount(routing.expert[torch.tensor(kept, dtype=torch.bool)], minlength=E)
    assert torch.equal(layer.last_stats.tokens_per_expert, per_expert)
    ref = reference_moe(x, routing, layer.experts, C, policy)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)


# Field paths, and fragments of --set items: real keys, separators and junk.
PATHS = sorted(BAD)
PIECES = st.one_of(
    st.sampled_from(PATHS),
    st.sampled_from(["=", ".", "none", "true", "{}", "[", "1e999", "-0", "nan", '{"a": 1}']),
    st.text(string.printable, max_size=8),
)


@FAST
@given(items=st.lists(st.lists(PIECES, min_size=1, max_size=4).map("".join), max_size=3))
def test_the_set_parser_accepts_or_raises_one_line_config_errors(items):
    try:
        cfg = apply_overrides(get_recipe("lm-moe-test"), items)
    except ConfigError as err:
        assert "\n" not in str(err) and str(err)
        return
    assert isinstance(cfg, RunConfig)


@FAST
@given(path=st.sampled_from(PATHS), raw=st.text(max_size=12))
def test_any_value_for_any_field_is_accepted_or_a_config_error_naming_it(path, raw):
    try:
        # on a recipe that holds the field's section (an image or LSTM run for theirs)
        apply_overrides(get_recipe(_recipe(path)), [f"{path}={raw}"])
    except ConfigError as err:
        text = str(err)
        assert "\n" not in text
        assert path.split(".")[-1] in text or "router" in text, text


def _fix_digest(path: Path, name: str) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["sha256"][name] = hashlib.sha256((path / name).read_bytes()).hexdigest()
    (path / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory):
    """The files of one real checkpoint, to mutate."""
    path = save_checkpoint(
        tmp_path_factory.mktemp("ckpt"), 3, create("lm-moe-test"), {"step": 3, "x": [1.0]}
    )
    return {f.name: f.read_bytes() for f in path.iterdir()}


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    name=st.sampled_from(["model.safetensors", "state.pt", "manifest.json"]),
    how=st.sampled_from(["random", "truncate", "flip", "splice"]),
    data=st.data(),
)
def test_the_loader_on_random_or_damaged_bytes_raises_only_checkpoint_errors(
    checkpoint_bytes, name, how, data
):
    original = checkpoint_bytes[name]
    if how == "random":
        new = data.draw(st.binary(max_size=300))
    elif how == "truncate":
        new = original[: data.draw(st.integers(0, len(original) - 1))]
    elif how == "flip":
        at = data.draw(st.integers(0, len(original) - 1))
        new = (
            original[:at]
            + bytes([original[at] ^ data.draw(st.integers(1, 255))])
            + original[at + 1 :]
        )
    else:
        at = data.draw(st.integers(0, len(original)))
        new = original[:at] + data.draw(st.binary(min_size=1, max_size=64)) + original[at:]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp)
        for file, content in checkpoint_bytes.items():
            (path / file).write_bytes(content)
        (path / name).write_bytes(new)
        if name != "manifest.json" and data.draw(st.booleans()):
            _fix_digest(path, name)  # past the digest: the parsers themselves must hold
        try:
            weights, state = read_checkpoint(path)
        except CheckpointError as err:
            assert "\n" not in str(err).strip() and str(path) in str(err)
            return
        # the damage missed everything that matters (e.g. padding): a well-formed result
        assert isinstance(state, dict) and state["step"] == 3
        assert all(isinstance(t, torch.Tensor) for t in weights.values())
