"""Sharded (DCP) checkpoints keep the guarantees of the safetensors ones: exact round trip,
atomic publication, a failed save that keeps the previous checkpoint, non-finite weights
refused, corrupted shards detected and skipped, and nothing in the files ever executed."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

import moesaic as ms
from moesaic.parallel import dcp as dcp_io
from moesaic.parallel.groups import single_process
from moesaic.train.checkpoint import (
    CheckpointError,
    CheckpointWriteError,
    NonFiniteWeightsError,
    ShardedWeights,
    _sha256,
    latest_checkpoint,
    read_checkpoint,
    resumable_checkpoint,
    save_sharded_checkpoint,
)


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 8), ms.MoE(8, 16, 4, router="topk", top_k=2))


def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(5, 8)).sum().backward()
    opt.step()
    return opt


def _save(tmp_path: Path, step: int, model: nn.Module, opt=None) -> Path | None:
    state = {"step": step, "note": "x"}
    return save_sharded_checkpoint(tmp_path, step, model, opt, state, single_process())


def test_round_trip_of_weights_and_optimizer_moments(tmp_path):
    model = _model()
    opt = _optimizer(model)
    path = _save(tmp_path, 3, model, opt)
    assert latest_checkpoint(tmp_path) == path
    weights, state = read_checkpoint(path)
    assert isinstance(weights, ShardedWeights) and state == {"step": 3, "note": "x"}
    assert dict(weights.shapes) == {k: v.shape for k, v in model.state_dict().items()}
    for name, t in model.state_dict().items():
        assert torch.equal(weights[name], t), name
    other = _model(seed=1)
    other_opt = torch.optim.AdamW(other.parameters(), lr=1e-2)
    dcp_io.load_state(path / "dcp", other, other_opt, single_process())
    for (name, a), b in zip(model.named_parameters(), other.parameters()):
        assert torch.equal(a, b), name
        for moment in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[a][moment], other_opt.state[b][moment]), name


def test_a_failed_save_keeps_the_previous_checkpoint_and_leaves_nothing(tmp_path, monkeypatch):
    model = _model()
    first = _save(tmp_path, 1, model)
    real = dcp_io.save_state

    def disk_full(directory, *args):
        real(directory, *args)  # the shards are written, then the disk fills up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dcp_io, "save_state", disk_full)
    with pytest.raises(CheckpointWriteError, match="No space left on device.*step-000001 is"):
        _save(tmp_path, 2, model)
    assert latest_checkpoint(tmp_path) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-000001"]
    read_checkpoint(first)


def test_non_finite_weights_are_refused_before_anything_is_written(tmp_path):
    model = _model()
    with torch.no_grad():
        model[1].experts.w2[1, 0, 0] = float("nan")
    with pytest.raises(NonFiniteWeightsError, match="1.experts.w2"):
        _save(tmp_path, 1, model)
    assert not list(tmp_path.iterdir())


def _rehash(path: Path, name: str) -> None:
    """Make the manifest agree with a tampered file (as a forger would)."""
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["sha256"][name] = _sha256(path / name)
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_a_corrupted_shard_is_detected_and_the_previous_checkpoint_used(tmp_path):
    model = _model()
    _save(tmp_path, 1, model)
    newest = _save(tmp_path, 2, model)
    shard = next((newest / "dcp").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    said = []
    path, _, state = resumable_checkpoint(tmp_path, said.append)
    assert state["step"] == 1 and path.name == "step-000001"
    assert shard.name in said[0] and "SHA-256" in said[0]


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/moesaic-pwned",))


def test_a_metadata_pickle_naming_other_globals_is_refused_not_run(tmp_path):
    path = _save(tmp_path, 1, _model())
    (path / "dcp" / ".metadata").write_bytes(pickle.dumps(_Evil()))
    _rehash(path, "dcp/.metadata")
    with pytest.raises(CheckpointError, match="'posix.system' is not allowed"):
        read_checkpoint(path)
    assert not Path("/tmp/moesaic-pwned").exists()


def test_a_manifest_naming_files_outside_the_checkpoint_is_malformed(tmp_path):
    path = _save(tmp_path, 1, _model())
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["sha256"]["dcp/../../escape"] = "0" * 64
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="malformed"):
        read_checkpoint(path)
