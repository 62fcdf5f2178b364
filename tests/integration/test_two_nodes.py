"""Two local "nodes" under ``torchrun --nnodes 2`` (c10d rendezvous, 2 ranks each: expert-
parallel 2 x data-parallel 2) train the same run as one process (the same losses to 1e-5), and a
rank killed on either node restarts both nodes, which end bit-identical to an uninterrupted
two-node run."""

from __future__ import annotations

import random

import pytest
import torch

from benchmarks.faults import (
    EVERY,
    STEPS,
    kill_at_step,
    start,
    stop,
    train_command,
    two_node_commands,
    worker_pid,
)
from moesaic.train.checkpoint import latest_checkpoint, read_checkpoint
from tests.cases import metric_rows, without_timings

# Deterministic routing and no aux loss, as in tests/distributed/test_training.py: router noise
# is drawn per rank and the balance loss is a per-rank statistic, so only without them are one
# process and four the same function.
SAME_FUNCTION = ["model.moe.router=topk", "model.moe.top_k=2", "model.moe.aux_loss_weight=0"]


def _run_nodes(run_dir, restarts=0, kill_step=None):
    """The two agents' (returncode, stdout, stderr), after killing one worker at ``kill_step``."""
    procs = [
        start(cmd) for cmd in two_node_commands(run_dir, restarts=restarts, settings=SAME_FUNCTION)
    ]
    try:
        if kill_step is not None:
            agent = random.choice(procs)
            kill_at_step(procs[0], run_dir, kill_step, lambda: worker_pid(agent.pid))
        outputs = [p.communicate(timeout=300) for p in procs]
    finally:  # nothing outlives the test, whatever failed
        for p in procs:
            stop(p)
    return [(p.returncode, *out) for p, out in zip(procs, outputs)]


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    run = tmp_path_factory.mktemp("two-nodes") / "run"
    return run, _run_nodes(run)


def _losses(run_dir):
    rows = metric_rows(run_dir)
    return {(r["step"], key): r[key] for r in rows for key in ("loss", "val_loss") if key in r}


def test_a_two_node_launch_trains_like_one_process(tmp_path, two_nodes):
    two, results = two_nodes
    one = tmp_path / "one"
    reference = start(train_command(one, settings=SAME_FUNCTION))
    try:
        ref_out, ref_err = reference.communicate(timeout=300)
    finally:
        stop(reference)
    assert reference.returncode == 0, ref_err[-3000:]
    for code, _, err in results:
        assert code == 0, err[-3000:]
    # only global rank 0 reports and writes the run
    assert sum("validation loss:" in out for _, out, _ in results) == 1
    got, want = _losses(two), _losses(one)
    assert got.keys() == want.keys() and (STEPS, "loss") in want
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_a_rank_killed_on_either_node_restarts_both_and_ends_bit_identical(tmp_path, two_nodes):
    reference, _ = two_nodes
    run = tmp_path / "run"
    results = _run_nodes(run, restarts=1, kill_step=random.randint(EVERY + 1, STEPS - 5))
    for code, _, err in results:
        assert code == 0, err[-3000:]
    assert sum(out.count("run directory:") for _, out, _ in results) == 2  # restarted once
    assert without_timings(run) == without_timings(reference)
    got, _ = read_checkpoint(latest_checkpoint(run / "checkpoints"))
    want, _ = read_checkpoint(latest_checkpoint(reference / "checkpoints"))
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
