"""benchmarks/workspace.py runs as a script in its quick mode and prints every table."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.workspace import distinct_symbols

ROOT = Path(__file__).resolve().parents[2]


def test_quick_run_prints_the_comparison_and_both_sweeps(tmp_path):
    out, plot = tmp_path / "workspace.json", tmp_path / "workspace.png"
    args = ["--quick", "--threads", "1", "--out", str(out), "--plot", str(plot)]
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "workspace.py"), *args],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    text = done.stdout
    assert "| model | slots m | top-k |" in text and "| pairwise attention (TR) | - | - |" in text
    for m in (1, 2, 4, 8):
        assert f"\n| {m} | " in text  # a row of the slots sweep
    assert "| top-k | parameters |" in text and "| n = 16 (soft) | " in text
    record = json.loads(out.read_text())
    rows = record["results"]
    # equal parameters, up to one FFN hidden unit (2 * d_model weights)
    assert abs(rows["attention"]["params"] - rows["m=8,k=4"]["params"]) <= 2 * 32
    assert plot.read_bytes().startswith(b"\x89PNG")


def test_the_task_is_deterministic_and_labels_count_the_distinct_symbols():
    x, y = distinct_symbols(64, 12, 5, seed=3)
    x2, y2 = distinct_symbols(64, 12, 5, seed=3)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert x.shape == (64, 12) and int(x.min()) >= 0 and int(x.max()) < 5
    assert [len(set(row.tolist())) - 1 for row in x] == y.tolist()
    assert set(y.tolist()) == set(range(5))  # every count from 1 to V occurs
