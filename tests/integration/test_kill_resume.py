"""A training process SIGKILLed at a random step and resumed from its last checkpoint ends with
losses and weights bit-identical to a run that was never interrupted (one process, and 2 gloo
ranks under torchrun --max-restarts 1 with one rank killed, expert-parallel, and with FSDP2 and
sharded DCP checkpoints)."""

from __future__ import annotations

import json
import random
import re
import signal
import time

import pytest
import torch

from benchmarks.faults import (
    EVERY,
    STEPS,
    kill_at_step,
    start,
    stop,
    torchrun_command,
    train_command,
    wait_for_step,
    worker_pid,
)
from moesaic.train.checkpoint import latest_checkpoint, read_checkpoint


def _rows(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "train_s")} for r in rows]


def _assert_identical(run, reference):
    assert _rows(run) == _rows(reference)
    assert [r["step"] for r in _rows(run) if "loss" in r] == list(range(1, STEPS + 1))
    got, _ = read_checkpoint(latest_checkpoint(run / "checkpoints"))
    want, _ = read_checkpoint(latest_checkpoint(reference / "checkpoints"))
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


def _resume(run):
    """``moesaic train --resume`` of ``run``, which must succeed; its stderr."""
    resumed = start(train_command(run, "--resume"))
    try:
        out, err = resumed.communicate(timeout=300)
    finally:
        stop(resumed)
    assert resumed.returncode == 0, err[-3000:]
    return err


def _assert_like_reference(run, reference):
    ref_run, ref_proc = reference
    assert ref_proc.wait(timeout=300) == 0, ref_proc.stderr.read()[-3000:]
    _assert_identical(run, ref_run)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run (started at once; it trains while the tests kill theirs)."""
    run = tmp_path_factory.mktemp("reference") / "run"
    proc = start(train_command(run))
    yield run, proc
    stop(proc)


@pytest.mark.parametrize("damage", [None, "truncate"], ids=["kill", "kill-then-truncate"])
def test_sigkill_at_a_random_step_then_resume_is_bit_identical(tmp_path, reference, damage):
    run = tmp_path / "run"
    kill_step = random.randint(2 * EVERY + 1, STEPS - 1)
    proc = start(train_command(run))
    seen = kill_at_step(proc, run, kill_step)
    assert proc.wait() == -signal.SIGKILL and seen < STEPS, f"killed at step {seen}"
    newest = latest_checkpoint(run / "checkpoints")
    if damage:  # the newest checkpoint cut short: --resume must fall back and say so
        data = (newest / "model.safetensors").read_bytes()
        (newest / "model.safetensors").write_bytes(data[: random.randrange(len(data))])
    err = _resume(run)
    if damage:
        assert f"checkpoint {newest.name} is unusable (" in err and "model.safetensors" in err
        assert "using the previous good checkpoint step-" in err
    else:
        assert "unusable" not in err
    _assert_like_reference(run, reference)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_sigint_or_sigterm_checkpoints_at_the_step_boundary_and_resumes_bit_identical(
    tmp_path, reference, signum
):
    run = tmp_path / "run"
    proc = start(train_command(run))
    try:
        wait_for_step(proc, run, random.randint(1, STEPS - 3))
        time.sleep(random.uniform(0, 0.05))  # anywhere inside a step, an eval or a save
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=300)
    finally:
        stop(proc)
    assert proc.returncode == 128 + signum, err[-3000:]
    last = err.strip().splitlines()[-1]
    name = signal.Signals(signum).name
    step = int(re.search(rf"{name} at step (\d+): checkpoint step-0*(\d+) saved", last)[1])
    assert latest_checkpoint(run / "checkpoints").name == f"step-{step:06d}"
    _resume(run)
    _assert_like_reference(run, reference)


@pytest.mark.parametrize(
    "settings",
    [("parallel.expert=2",), ("parallel.expert=2", "parallel.shard=2")],
    ids=["expert-parallel", "fsdp2-expert-parallel-dcp"],
)
def test_torchrun_restarts_after_a_rank_is_killed_and_ends_bit_identical(tmp_path, settings):
    ref, run = tmp_path / "ref", tmp_path / "run"
    ref_proc = start(torchrun_command(ref, restarts=0, settings=settings))
    proc = start(torchrun_command(run, restarts=1, settings=settings))
    try:
        rank = random.randint(0, 1)
        seen = kill_at_step(
            proc, run, random.randint(EVERY + 1, STEPS - 2), lambda: worker_pid(proc.pid, rank)
        )
        out, err = proc.communicate(timeout=300)
        assert ref_proc.wait(timeout=300) == 0, ref_proc.stderr.read()[-3000:]
    finally:  # nothing outlives the test, whatever failed
        stop(proc)
        stop(ref_proc)
    assert proc.returncode == 0, err[-3000:]
    assert out.count("run directory:") == 2, "rank 0 starts twice: torchrun restarted the job"
    assert out.count("validation loss:") == 1, f"rank {rank} killed at step {seen}"
    sharded = (latest_checkpoint(run / "checkpoints") / "dcp").is_dir()
    assert sharded == ("parallel.shard=2" in settings)  # FSDP resumed from DCP shards
    _assert_identical(run, ref)
