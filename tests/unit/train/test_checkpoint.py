import hashlib
import io
import json
import shutil

import pytest
import torch

from moesaic.config import MoEConfig
from moesaic.models.registry import create
from moesaic.train.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    read_checkpoint,
    resumable_checkpoint,
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
        two = MoEConfig(num_experts=2, top_k=1)
        load_checkpoint(path, create("lm-moe-test", moe=two))


class _Evil:
    """Unpickling this would create the file ``target`` (if anything ran the pickle's code)."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (exec, (f"open({self.target!r}, 'w').write('pwned')",))


def _plant(path, name, data):
    """Replace ``path/name`` by ``data`` and fix the manifest's digest to match."""
    (path / name).write_bytes(data)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["sha256"][name] = hashlib.sha256(data).hexdigest()
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_a_malicious_pickle_in_the_state_is_refused_and_never_runs(tmp_path):
    path = _save(tmp_path / "ckpt", 1, create("lm-moe-test"))
    target = tmp_path / "pwned.txt"
    buf = io.BytesIO()
    torch.save({"step": 1, "payload": _Evil(target)}, buf)
    _plant(path, "state.pt", buf.getvalue())  # even with a matching digest
    with pytest.raises(
        CheckpointError, match=r"state.pt is refused: .*\(refused global (builtins\.)?exec\)"
    ):
        load_checkpoint(path, create("lm-moe-test"))
    assert not target.exists()
    # the same pickle loaded without the guard would have run the code: the test can fail
    torch.load(path / "state.pt", weights_only=False)
    assert target.read_text() == "pwned"


def _three(tmp_path):
    model = create("lm-moe-test")
    return [save_checkpoint(tmp_path, s, model, {"step": s}, keep=3) for s in (1, 2, 3)]


@pytest.mark.parametrize("victim", ["model.safetensors", "state.pt", "manifest.json"])
def test_resume_falls_back_to_the_previous_good_checkpoint_and_says_so(tmp_path, victim):
    paths = _three(tmp_path)
    data = (paths[-1] / victim).read_bytes()
    (paths[-1] / victim).write_bytes(data[: len(data) // 3])  # truncated
    said = []
    path, _, state = resumable_checkpoint(tmp_path, said.append)
    assert path == paths[1] and state["step"] == 2
    assert f"step-000003 is unusable ({paths[-1] / victim}" in said[0]
    assert said[1] == "using the previous good checkpoint step-000002 (step 2)"


def test_latest_naming_a_missing_directory_falls_back(tmp_path):
    paths = _three(tmp_path)
    shutil.rmtree(paths[-1])
    said = []
    assert resumable_checkpoint(tmp_path, said.append)[0] == paths[1]
    assert said == [
        f"{tmp_path / 'latest'} names 'step-000003', which is not a checkpoint here; ignoring it"
    ]


@pytest.mark.parametrize("junk", [b"garbage", b"\xff\xfe\x00", b"", b"../step-000001"])
def test_a_garbage_latest_pointer_is_ignored_with_a_word(tmp_path, junk):
    paths = _three(tmp_path)
    (tmp_path / "latest").write_bytes(junk)
    said = []
    assert resumable_checkpoint(tmp_path, said.append)[0] == paths[-1]
    assert len(said) == 1 and "which is not a checkpoint here; ignoring it" in said[0]


def test_when_no_checkpoint_verifies_every_failure_is_named(tmp_path):
    paths = _three(tmp_path)
    for p in paths:
        (p / "state.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="no checkpoint in .* is usable: step-000003.*000001"):
        resumable_checkpoint(tmp_path, lambda _: None)
    assert resumable_checkpoint(tmp_path / "none", print) is None


def test_a_flipped_bit_is_caught_by_the_digest(tmp_path):
    path = _three(tmp_path)[-1]
    data = bytearray((path / "model.safetensors").read_bytes())
    data[len(data) // 2] ^= 1
    (path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model.safetensors is missing or corrupted"):
        read_checkpoint(path)


@pytest.mark.parametrize(
    "name,data,match",
    [
        ("model.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage", "not a valid"),
        ("state.pt", b"PK\x03\x04 not really a zip", "state.pt cannot be read"),
        ("manifest.json", b"[1, 2]", "manifest.json is unreadable"),
        ("manifest.json", b'{"sha256": {"../../x": "0"}}', "manifest.json is malformed"),
    ],
)
def test_garbage_with_a_matching_digest_is_a_checkpoint_error_naming_the_file(
    tmp_path, name, data, match
):
    path = _three(tmp_path)[-1]
    if name == "manifest.json":
        (path / name).write_bytes(data)
    else:
        _plant(path, name, data)
    with pytest.raises(CheckpointError, match=match):
        read_checkpoint(path)


def test_the_next_save_removes_what_a_killed_save_left(tmp_path):
    model = create("lm-moe-test")
    save_checkpoint(tmp_path, 1, model, {"step": 1})
    (tmp_path / ".tmp-step-000002-abc").mkdir()
    (tmp_path / ".tmp-step-000002-abc" / "model.safetensors").write_bytes(b"partial")
    save_checkpoint(tmp_path, 2, model, {"step": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-000001", "step-000002"]


@pytest.mark.parametrize("nth", range(1, 8))  # a save makes 7 fsyncs: a kill before each
def test_a_sigkill_anywhere_in_a_save_leaves_a_loadable_checkpoint(tmp_path, nth):
    import os
    import signal

    from moesaic.train import checkpoint

    old, new = {"w": torch.zeros(64)}, {"w": torch.ones(64)}
    save_checkpoint(tmp_path, 1, old, {"step": 1})
    pid = os.fork()
    if pid == 0:  # the child dies by SIGKILL at its nth fsync
        calls, real = [0], checkpoint._fsync

        def fsync(path):
            calls[0] += 1
            if calls[0] == nth:
                os.kill(os.getpid(), signal.SIGKILL)
            real(path)

        checkpoint._fsync = fsync
        save_checkpoint(tmp_path, 2, new, {"step": 2})
        os._exit(0)  # never reached
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    said = []
    _, weights, state = resumable_checkpoint(tmp_path, said.append)
    assert not said, said  # nothing half-written is ever taken for a checkpoint
    assert torch.equal(weights["w"], (old, new)[state["step"] - 1]["w"])
    assert state["step"] == (2 if nth >= 5 else 1)  # complete once renamed (before the 5th)
