import pickle

import pytest
import torch

from moesaic.models.registry import create
from moesaic.train.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)


def _save(tmp_path, step, model, **state):
    return save_checkpoint(tmp_path, step, model, {"step": step, **state}, keep=2)


def test_round_trip_restores_weights_and_state(tmp_path):
    model = create("lm-moe-test")
    path = _save(tmp_path, 5, model, extra=torch.arange(3))
    twin = create("lm-moe-test")
    state = load_checkpoint(path, twin)
    assert state["step"] == 5 and torch.equal(state["extra"], torch.arange(3))
    for a, b in zip(model.state_dict().values(), twin.state_dict().values()):
        assert torch.equal(a, b)
    assert twin.head.weight is twin.embed.weight  # ties survive


def test_keeps_the_newest_n_and_points_latest_at_the_last(tmp_path):
    model = create("lm-moe-test")
    for step in (1, 2, 3):
        _save(tmp_path, step, model)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-000002", "step-000003"]
    assert latest_checkpoint(tmp_path).name == "step-000003"


@pytest.mark.parametrize("victim", ["model.safetensors", "state.pt"])
def test_a_corrupted_file_is_named_on_load(tmp_path, victim):
    path = _save(tmp_path, 1, create("lm-moe-test"))
    data = (path / victim).read_bytes()
    (path / victim).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=victim):
        load_checkpoint(path, create("lm-moe-test"))


def test_a_checkpoint_for_another_architecture_lists_every_mismatch(tmp_path):
    path = _save(tmp_path, 1, create("lm-moe-test"))
    with pytest.raises(CheckpointError, match="does not fit the model: .*blocks.1.ffn.experts.w1"):
        load_checkpoint(path, create("lm-moe-test", num_experts=2))


class _Evil:
    def __reduce__(self):
        return (exec, ("import os; os.environ['MOESAIC_PWNED'] = '1'",))


def test_a_malicious_pickle_in_the_state_is_refused(tmp_path, monkeypatch):
    import hashlib
    import json
    import os

    path = _save(tmp_path, 1, create("lm-moe-test"))
    (path / "state.pt").write_bytes(b"")
    torch.save({"step": 1, "payload": _Evil()}, path / "state.pt", pickle_protocol=2)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["sha256"]["state.pt"] = hashlib.sha256((path / "state.pt").read_bytes()).hexdigest()
    (path / "manifest.json").write_text(json.dumps(manifest))  # even with a matching digest
    monkeypatch.delenv("MOESAIC_PWNED", raising=False)
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(path, create("lm-moe-test"))
    assert "MOESAIC_PWNED" not in os.environ
