"""The run directory is never damaged by a second process, a killed write, a damaged file or a
checkpoint count past a million: one lock per run, atomic run files, numeric checkpoint order,
step records that must agree, and a config that survives in every checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from moesaic.cli.train import main as train_main
from moesaic.models.registry import create
from moesaic.train.checkpoint import (
    CheckpointError,
    list_checkpoints,
    read_checkpoint,
    resumable_checkpoint,
    save_checkpoint,
)
from moesaic.train.config import apply_overrides
from moesaic.train.recipes import get_recipe
from moesaic.train.runlock import RunDirError, RunLock
from moesaic.train.trainer import Trainer

QUICK = ["train.steps=4", "train.checkpoint_every=2", "train.eval_every=2", "train.sample_tokens=0"]


def _cfg(*overrides):
    return apply_overrides(get_recipe("lm-moe-test"), [*QUICK, *overrides])


def test_checkpoints_past_step_999999_are_ordered_by_number(tmp_path):
    model = create("lm-moe-test")
    for step in (999_998, 999_999, 1_000_000, 1_000_001):
        save_checkpoint(tmp_path, step, model, {"step": step}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-1000000", "step-1000001"]
    path, _, state = resumable_checkpoint(tmp_path, print)
    assert path.name == "step-1000001" and state["step"] == 1_000_001


def test_a_checkpoint_mixing_two_steps_files_is_refused_and_skipped(tmp_path):
    model = create("lm-moe-test")
    two = save_checkpoint(tmp_path, 2, model, {"step": 2}, keep=3)
    three = save_checkpoint(tmp_path, 3, model, {"step": 3}, keep=3)
    (three / "state.pt").write_bytes((two / "state.pt").read_bytes())  # step 2's state
    manifest = json.loads((three / "manifest.json").read_text())
    import hashlib

    manifest["sha256"]["state.pt"] = hashlib.sha256((three / "state.pt").read_bytes()).hexdigest()
    (three / "manifest.json").write_text(json.dumps(manifest))  # the digests even agree
    with pytest.raises(CheckpointError, match="mixes files of different steps"):
        read_checkpoint(three)
    said = []
    assert resumable_checkpoint(tmp_path, said.append)[0] == two
    assert "step-000003 is unusable" in said[0]


def test_a_checkpoint_that_does_not_fit_falls_back_to_one_that_does(tmp_path):
    run = tmp_path / "run"
    Trainer(_cfg(), run, progress=False).fit()
    newest = list_checkpoints(run / "checkpoints")[-1]
    other = create("lm-moe-test", d_model=48, n_heads=2)  # another model's weights
    save_checkpoint(run / "checkpoints", 5, other, {"step": 5}, keep=5)
    resumed = Trainer(_cfg("train.steps=6"), run, progress=False, resume=True)
    assert resumed.step == 4 and newest.name == "step-000004"


def test_a_second_process_on_the_run_directory_is_refused_with_the_holders_pid(tmp_path, capsys):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from moesaic.train.runlock import RunLock; "
            f"lock = RunLock({str(tmp_path)!r}).acquire(); "
            "print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        argv = ["--recipe", "lm-moe-test", "--run-dir", str(tmp_path), "--no-progress"]
        assert train_main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"is in use by another process (pid {holder.pid}," in err[0]
        assert not (tmp_path / "metrics.jsonl").exists()  # nothing was written
    finally:
        holder.kill()
        holder.wait()
    RunLock(tmp_path).acquire().release()  # the kernel released the killed holder's lock


def test_a_fresh_start_refuses_a_directory_holding_checkpoints(tmp_path):
    run = tmp_path / "run"
    Trainer(_cfg(), run, progress=False).fit()
    before = (run / "metrics.jsonl").read_text()
    with pytest.raises(RunDirError, match="already holds a run .*step-000004.*--resume"):
        Trainer(_cfg(), run, progress=False)
    assert (run / "metrics.jsonl").read_text() == before


def test_stale_temporary_files_of_killed_writers_are_removed_at_start(tmp_path):
    run = tmp_path / "run"
    Trainer(_cfg(), run, progress=False).fit(max_steps=2)
    stale = [
        run / "checkpoints" / ".latest.99999.tmp",
        run / ".metrics.jsonl.99999.tmp",
        run / "checkpoints" / ".tmp-step-000003-abc",
    ]
    stale[-1].mkdir()
    for path in stale[:2]:
        path.write_text("x")
    Trainer(_cfg(), run, progress=False, resume=True)
    assert not any(p.exists() for p in stale)


@pytest.mark.parametrize("damage", ["", '{"recipe": ', "\x00\x00"])
def test_a_damaged_config_json_is_recovered_from_the_checkpoint(tmp_path, capsys, damage):
    run = tmp_path / "run"
    assert (
        train_main(
            [
                "--recipe",
                "lm-moe-test",
                "--run-dir",
                str(run),
                "--no-progress",
                *[a for s in QUICK for a in ("--set", s)],
                "--set",
                "train.steps=2",
            ]
        )
        == 0
    )
    (run / "config.json").write_text(damage)
    capsys.readouterr()
    assert (
        train_main(["--run-dir", str(run), "--resume", "--no-progress", "--set", "train.steps=4"])
        == 0
    )
    err = capsys.readouterr().err
    assert f"{run / 'config.json'} is unreadable" in err
    assert "using the copy in checkpoint step-000002" in err
    assert json.loads((run / "config.json").read_text())["recipe"] == "lm-moe-test"


def test_a_damaged_config_without_checkpoints_is_one_line(tmp_path, capsys):
    (tmp_path / "config.json").write_text("")
    assert train_main(["--run-dir", str(tmp_path), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config.json is unreadable" in err[0]
    assert "no checkpoint holds a copy" in err[0]


def test_auto_resume_before_the_first_checkpoint_keeps_the_runs_config(tmp_path):
    run = tmp_path / "run"
    trainer = Trainer(_cfg("train.steps=3", "train.checkpoint_every=10"), run, progress=False)
    del trainer  # started, config.json written, no checkpoint yet (as if killed)
    before = json.loads((run / "config.json").read_text())
    assert train_main(["--run-dir", str(run), "--auto-resume", "--no-progress"]) == 0
    after = json.loads((run / "config.json").read_text())
    assert after == before and after["recipe"] == "lm-moe-test"
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step-000003"]


def test_run_files_are_replaced_atomically(tmp_path, monkeypatch):
    """config.json and metrics.jsonl go through a temporary file and a rename: a reader (or a
    kill) sees the old file or the new one, never an empty or half-written one."""
    run = tmp_path / "run"
    Trainer(_cfg(), run, progress=False).fit(max_steps=2)
    renamed = []
    real = os.replace
    monkeypatch.setattr(
        os, "replace", lambda a, b: (renamed.append(os.path.basename(b)), real(a, b))[1]
    )
    Trainer(_cfg(), run, progress=False, resume=True)
    assert {"metrics.jsonl", "config.json", "routing.jsonl"} <= set(renamed)


def test_a_large_val_fraction_keeps_every_domain_in_both_streams(monkeypatch):
    from moesaic.data.corpora import Document
    from moesaic.train import data as train_data

    docs = [Document(f"d{i}", f"{'ab' * 200} {i}", f"domain{i % 3}") for i in range(12)]
    monkeypatch.setattr(train_data, "load_corpus", lambda name: docs)
    for fraction in (0.2, 0.5, 0.9, 0.99):
        cfg = apply_overrides(get_recipe("lm-moe-test"), [f"data.val_fraction={fraction}"])
        prepared = train_data.prepare_data(cfg.data)
        assert prepared.train.domains == prepared.val.domains == ["domain0", "domain1", "domain2"]
        assert len(prepared.train) + len(prepared.val) > 0


def test_threads_beyond_the_cpus_are_refused(tmp_path):
    from moesaic.train.resources import ResourceError

    with pytest.raises(ResourceError, match=r"train.threads=100000 must be <= \d+"):
        Trainer(_cfg("train.threads=100000"), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_the_memory_bound_counts_parameters_exactly_and_refuses_what_cannot_fit():
    from moesaic.train.resources import ResourceError, check_resources, estimate_needs

    for overrides, fields in (
        ([], {}),
        (["model.n_layers=5", "model.moe_every=2"], {"n_layers": 5, "moe_every": 2}),
        (["model.moe=none"], {"moe": None}),
    ):
        cfg = _cfg(*overrides)
        model = create("lm-moe-test", **fields)
        assert estimate_needs(cfg).parameters == sum(p.numel() for p in model.parameters())
    needs = check_resources(_cfg(), available=1 << 40)
    with pytest.raises(ResourceError, match=r"needs at least .* GiB of memory and 0\.0 GiB"):
        check_resources(_cfg(), available=needs.total_bytes - 1)
    huge = _cfg("model.moe.num_experts=100000000")
    assert estimate_needs(huge).parameters > 10**11  # counted on the meta device, no memory


def test_a_failed_save_is_one_line_and_keeps_the_previous_checkpoint(tmp_path):
    """A file size limit (as ``ulimit -f``) makes the second save fail mid-write."""
    run = tmp_path / "run"
    code = (
        "import resource, sys\n"
        "from moesaic.train import checkpoint\n"
        "real = checkpoint.save_checkpoint\n"
        "def limited(*a, **k):\n"
        "    if a[1] == 4:\n"
        "        resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))\n"
        "    return real(*a, **k)\n"
        "checkpoint.save_checkpoint = limited\n"
        "import moesaic.train.trainer as t; t.save_checkpoint = limited\n"
        "from moesaic.cli.train import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    sets = [a for s in QUICK for a in ("--set", s)]
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "--recipe",
            "lm-moe-test",
            *sets,
            "--run-dir",
            str(run),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert "Traceback" not in done.stderr
    assert "cannot write checkpoint" in lines[-1] and "step-000004" in lines[-1]
    assert "step-000002 is intact" in lines[-1]
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step-000002"]
    assert not list((run / "checkpoints").glob(".tmp-*"))
    weights, state = read_checkpoint(run / "checkpoints" / "step-000002")
    assert state["step"] == 2 and all(torch.isfinite(w).all() for w in weights.values())


def test_sigterm_outside_training_exits_143_with_a_line(capsys):
    import signal
    import time

    from moesaic.cli.common import friendly_errors

    @friendly_errors("moesaic demo")
    def main(argv=None):
        os.kill(os.getpid(), signal.SIGTERM)  # e.g. preempted while printing the summary
        time.sleep(5)
        return 0

    before = signal.getsignal(signal.SIGTERM)
    assert main([]) == 143
    assert signal.getsignal(signal.SIGTERM) == before  # restored
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["moesaic demo: SIGTERM: stopped; the newest checkpoint, if any, is intact"]


OLD_FLAT = ("num_experts", "top_k", "router", "capacity_factor", "drop_policy")
OLD_FLAT += ("aux_loss_weight", "z_loss_weight", "router_options")


def test_a_run_written_with_the_moe_options_at_the_model_level_resumes_bit_identically(tmp_path):
    """Run directories written before ``model.moe`` store model.num_experts, model.top_k, ...:
    they load and resume as the same model with the same losses."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    Trainer(_cfg(), whole, progress=False).fit()
    Trainer(_cfg("train.steps=2"), split, progress=False).fit()
    data = json.loads((split / "config.json").read_text())
    moe = data["model"].pop("moe")
    data["model"] |= {name: moe[name] for name in OLD_FLAT}  # the layout of older moesaic
    data["train"]["steps"] = 4
    (split / "config.json").write_text(json.dumps(data))
    assert train_main(["--run-dir", str(split), "--resume", "--no-progress"]) == 0
    a = read_checkpoint(list_checkpoints(whole / "checkpoints")[-1])[0]
    b = read_checkpoint(list_checkpoints(split / "checkpoints")[-1])[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
