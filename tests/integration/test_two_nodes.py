"""Two local "nodes" under ``torchrun --nnodes 2`` (c10d rendezvous, 2 ranks each: expert-
parallel 2 x data-parallel 2) train the same run as one process: the same losses to 1e-5."""

from __future__ import annotations

import pytest

from benchmarks.faults import STEPS, start, stop, train_command, two_node_commands
from tests.cases import metric_rows

# Deterministic routing and no aux loss, as in tests/distributed/test_training.py: router noise
# is drawn per rank and the balance loss is a per-rank statistic, so only without them are one
# process and four the same function.
SAME_FUNCTION = ["model.moe.router=topk", "model.moe.top_k=2", "model.moe.aux_loss_weight=0"]


def _losses(run_dir):
    rows = metric_rows(run_dir)
    return {(r["step"], key): r[key] for r in rows for key in ("loss", "val_loss") if key in r}


def test_a_two_node_launch_trains_like_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    procs = [start(cmd) for cmd in two_node_commands(two, settings=SAME_FUNCTION)]
    reference = start(train_command(one, settings=SAME_FUNCTION))
    try:
        outputs = [p.communicate(timeout=300) for p in procs]
        ref_out, ref_err = reference.communicate(timeout=300)
    finally:  # nothing outlives the test, whatever failed
        for p in [*procs, reference]:
            stop(p)
    assert reference.returncode == 0, ref_err[-3000:]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    # only global rank 0 (node 0's first rank) reports and writes the run
    assert "validation loss:" in outputs[0][0] and "validation loss:" not in outputs[1][0]
    got, want = _losses(two), _losses(one)
    assert got.keys() == want.keys() and (STEPS, "loss") in want
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
