"""Fault drills: kill, corrupt and poison tiny training runs, then check what survived.

Each scenario trains the ``lm-moe-test`` recipe (20 steps, a checkpoint every 5) as a real
``moesaic train`` process, injects one fault at a random point, recovers the way a user would
(``--resume``; torchrun restarts), and compares the result with an uninterrupted run: it survived
when the metrics' losses and the final weights are bit-identical. Lost work is the training
steps redone after recovery and the bytes of checkpoint data thrown away.

    python benchmarks/faults.py --repeats 5

Scenarios: ``sigkill-train`` (SIGKILL at a random step), ``sigkill-save`` (SIGKILL at a random
point inside a checkpoint save), ``sigint`` / ``sigterm`` (the signal at a random moment: the
run checkpoints at the step boundary and exits 130 / 143, then ``--resume``),
``truncated-ckpt`` / ``corrupted-ckpt`` (the newest checkpoint's file cut short / one bit
flipped, then ``--resume``), ``nan-loss`` (a NaN loss at a random step, ``guard.nonfinite=skip``),
``nonfinite-update`` (an update writes inf into a weight: rolled back and replayed without it,
equal to the run that skipped that step), ``concurrent-runs`` (a second ``moesaic train`` on the
same run directory is refused; the first ends unharmed), ``disk-full`` (a save fails under a file
size limit: one line, nothing kept, then ``--resume``), ``step-million`` (steps 999,990 to
1,000,010 split in two sessions: numeric checkpoint order), ``rank-kill`` (one of 2 torchrun
ranks SIGKILLed, ``--max-restarts 1``).

    python benchmarks/faults.py                  # 5 drills per scenario
    python benchmarks/faults.py --repeats 1 --scenarios sigkill-train nan-loss   # quick
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # python benchmarks/<name>.py

import moesaic
from moesaic.parallel.launch import free_port

__all__ = [
    "STEPS",
    "EVERY",
    "train_command",
    "torchrun_command",
    "two_node_commands",
    "start",
    "stop",
    "wait_for_step",
    "kill_at_step",
    "logged_steps",
    "outcome",
    "same_outcome",
    "Drill",
    "SCENARIOS",
    "main",
]

STEPS, EVERY = 20, 5
ROOT = Path(moesaic.__file__).resolve().parents[1]
# Deterministic: one thread per process, every step logged (the kill trigger watches the log).
SETTINGS = [
    f"train.steps={STEPS}",
    f"train.checkpoint_every={EVERY}",
    f"train.eval_every={EVERY}",
    "train.log_every=1",
    "train.threads=1",
    "train.sample_tokens=0",
]
# Rows are compared without their timings (tokens/s, seconds) which differ from run to run.
TIMING_KEYS = ("tokens_per_s", "train_s")


def train_command(run_dir: Path, *flags: str, settings: Sequence[str] = ()) -> list[str]:
    """``python -m moesaic train`` of the drill recipe into ``run_dir``."""
    sets = [a for s in [*SETTINGS, *settings] for a in ("--set", s)]
    return [
        sys.executable,
        "-m",
        "moesaic",
        "train",
        "--recipe",
        "lm-moe-test",
        *sets,
        "--run-dir",
        str(run_dir),
        "--no-progress",
        *flags,
    ]


def torchrun_command(
    run_dir: Path, *, restarts: int = 1, settings: Sequence[str] = ("parallel.expert=2",)
) -> list[str]:
    """The drill under ``torchrun`` with 2 ranks (by default expert-parallel 2) that restarts
    ``restarts`` times; every start runs ``--auto-resume``."""
    cmd = train_command(run_dir, "--auto-resume", settings=list(settings))
    return _torchrun(cmd, restarts, f"127.0.0.1:{free_port()}")


def two_node_commands(
    run_dir: Path, *, restarts: int = 0, settings: Sequence[str] = ()
) -> list[list[str]]:
    """The drill as two local "nodes" of 2 ranks each (world 4, expert-parallel 2 x data-parallel
    2): one ``torchrun --nnodes 2`` agent per node, meeting at a c10d rendezvous on this machine,
    as the same job on two machines would with the endpoint set to the first one's address."""
    cmd = train_command(run_dir, "--auto-resume", settings=[*settings, "parallel.expert=2"])
    endpoint = f"127.0.0.1:{free_port()}"
    launch = ["--nnodes", "2", "--rdzv-id", "moesaic-drill"]
    return [_torchrun(cmd, restarts, endpoint, *launch, "--node-rank", str(n)) for n in (0, 1)]


def _torchrun(cmd: list[str], restarts: int, endpoint: str, *launch: str) -> list[str]:
    """``cmd`` (a ``python -m ...`` line) under a torchrun agent of 2 ranks with a c10d
    rendezvous at ``endpoint``, restarting its workers ``restarts`` times; ``launch`` adds
    options of the agent."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *launch,
        "--nproc_per_node",
        "2",
        "--max-restarts",
        str(restarts),
        "--monitor-interval",
        "0.1",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        endpoint,
        *cmd[1:],
    ]


def start(cmd: list[str]) -> subprocess.Popen:
    """Start ``cmd`` with this checkout importable, output captured."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: ``stop`` ends torchrun's workers too
    )


def stop(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc`` and everything it started (its process group), and reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.communicate()


def logged_steps(run_dir: Path) -> int:
    """The last training step in ``run_dir``'s metrics (0 when none)."""
    path = run_dir / "metrics.jsonl"
    last = 0
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                last = max(last, int(json.loads(line).get("step", 0)))
            except (ValueError, AttributeError):
                pass  # a line being written
    return last


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 120.0) -> int:
    """Wait until ``run_dir`` has logged ``step``; returns the last step logged then. Raises
    RuntimeError if ``proc`` ends first, TimeoutError (after stopping it) past ``timeout``."""
    deadline = time.monotonic() + timeout
    while (seen := logged_steps(run_dir)) < step:
        if proc.poll() is not None:
            raise RuntimeError(f"the run ended before step {step}: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            stop(proc)
            raise TimeoutError(f"step {step} was not reached in {timeout} s")
        time.sleep(0.002)
    return seen


def kill_at_step(
    proc: subprocess.Popen,
    run_dir: Path,
    step: int,
    victim: Callable[[], int] | None = None,
    timeout: float = 120.0,
) -> int:
    """SIGKILL ``victim()`` (default ``proc``) once ``run_dir`` has logged ``step``; returns the
    last step logged at the kill. Raises if ``proc`` ends first."""
    seen = wait_for_step(proc, run_dir, step, timeout)
    os.kill(victim() if victim else proc.pid, signal.SIGKILL)
    return seen


def worker_pid(agent_pid: int, rank: int | None = None, timeout: float = 60.0) -> int:
    """The pid of torchrun worker ``rank`` (a child of the agent ``agent_pid``); with ``rank``
    None, any of the agent's workers (under ``--nnodes 2`` the rendezvous decides which global
    ranks a node gets)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in _children(agent_pid):
            try:
                env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in env or (rank is None and _is_worker(env)):
                return child
        time.sleep(0.01)
    raise TimeoutError(f"no torchrun worker with RANK={rank} under pid {agent_pid}")


def _is_worker(env: list[bytes]) -> bool:
    return any(v.startswith(b"RANK=") for v in env)


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def outcome(run_dir: Path) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """(metrics rows without timings, final weights) of a finished run."""
    from moesaic.train.checkpoint import read_checkpoint, resumable_checkpoint

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]
    found = resumable_checkpoint(run_dir / "checkpoints", lambda _: None)
    if found is None:
        raise FileNotFoundError(f"{run_dir} has no checkpoint")
    return rows, read_checkpoint(found[0])[0]


def same_outcome(a: Path, b: Path) -> bool:
    """Whether two finished runs logged identical losses and ended with identical weights."""
    rows_a, weights_a = outcome(a)
    rows_b, weights_b = outcome(b)
    return (
        rows_a == rows_b
        and weights_a.keys() == weights_b.keys()
        and all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    )


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def _finish(proc: subprocess.Popen, timeout: float = 300.0) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(proc)
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@dataclasses.dataclass
class Drill:
    """One repetition of one scenario."""

    survived: bool
    steps_lost: int
    bytes_lost: int
    note: str = ""


@dataclasses.dataclass
class References:
    """Uninterrupted runs to compare with (made once, on first use)."""

    root: Path
    _single: Path | None = None
    _torchrun: Path | None = None

    @property
    def single(self) -> Path:
        if self._single is None:
            self._single = self.root / "ref-single"
            _check(_finish(start(train_command(self._single))), "the reference run")
        return self._single

    @property
    def torchrun(self) -> Path:
        if self._torchrun is None:
            self._torchrun = self.root / "ref-torchrun"
            _check(_finish(start(torchrun_command(self._torchrun, restarts=0))), "torchrun ref")
        return self._torchrun


def _check(done: subprocess.CompletedProcess, what: str) -> None:
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed ({done.returncode}): {done.stderr[-2000:]}")


def _newest_good_step(run_dir: Path) -> int:
    from moesaic.train.checkpoint import resumable_checkpoint

    found = resumable_checkpoint(run_dir / "checkpoints", lambda _: None)
    return 0 if found is None else int(found[2]["step"])


def _leftover_bytes(run_dir: Path) -> int:
    """Bytes of checkpoint data a recovery throws away: temporary directories of killed saves
    and checkpoints newer than the one that verifies."""
    ckpt = run_dir / "checkpoints"
    good = _newest_good_step(run_dir)
    lost = sum(_dir_bytes(p) for p in ckpt.glob(".tmp-*"))
    return lost + sum(_dir_bytes(p) for p in ckpt.glob("step-*") if int(p.name[5:]) > good)


def _resume_and_compare(run: Path, reference: Path, seen: int, expect: str = "") -> Drill:
    good, lost_bytes = _newest_good_step(run), _leftover_bytes(run)
    done = _finish(start(train_command(run, "--resume")))
    ok = done.returncode == 0 and expect in done.stderr and same_outcome(run, reference)
    note = "" if ok else f"rc={done.returncode} {done.stderr.strip()[-300:]}"
    return Drill(ok, seen - good, lost_bytes, note)


def sigkill_train(work: Path, refs: References, rng: random.Random) -> Drill:
    """SIGKILL the trainer at a random step after its first checkpoint; --resume."""
    run = work / "run"
    proc = start(train_command(run))
    seen = kill_at_step(proc, run, rng.randint(EVERY + 1, STEPS - 1))
    proc.wait()
    return _resume_and_compare(run, refs.single, seen)


# Runs ``moesaic train`` with a SIGKILL at the N-th fsync of the checkpoint writer: a random point
# inside a save (7 fsyncs per save: 3 files, the directory, the rename, the ``latest`` pointer).
_SAVE_KILLER = """
import os, signal, sys
from moesaic.train import checkpoint
import moesaic.train.trainer as trainer
n, calls, inside = int(sys.argv[1]), [0], [False]
real_fsync, real_save = checkpoint._fsync, trainer.save_checkpoint
def fsync(path):
    if inside[0]:  # only a save's fsyncs: run files are written atomically too
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
    real_fsync(path)
def save(*args, **kwargs):
    inside[0] = True
    try:
        return real_save(*args, **kwargs)
    finally:
        inside[0] = False
checkpoint._fsync, trainer.save_checkpoint = fsync, save
from moesaic.cli.train import main
sys.exit(main(sys.argv[2:]))
"""
FSYNCS_PER_SAVE = 7


def sigkill_save(work: Path, refs: References, rng: random.Random) -> Drill:
    """SIGKILL the trainer in the middle of its 2nd or 3rd checkpoint save; --resume."""
    run = work / "run"
    nth = rng.randint(FSYNCS_PER_SAVE + 1, 3 * FSYNCS_PER_SAVE)
    cmd = train_command(run)
    done = _finish(start([sys.executable, "-c", _SAVE_KILLER, str(nth), *cmd[4:]]))
    if done.returncode != -signal.SIGKILL:
        return Drill(False, 0, 0, f"the save was not killed (rc={done.returncode})")
    return _resume_and_compare(run, refs.single, logged_steps(run))


def _damage(kind: str) -> Callable[[Path, Path, random.Random], Drill]:
    def scenario(work: Path, refs: References, rng: random.Random) -> Drill:
        run = work / "run"
        proc = start(train_command(run))
        seen = kill_at_step(proc, run, rng.randint(2 * EVERY + 1, STEPS - 1))
        proc.wait()
        newest = max((run / "checkpoints").glob("step-*"))
        file = newest / rng.choice(["model.safetensors", "state.pt", "manifest.json"])
        data = bytearray(file.read_bytes())
        if kind == "truncated":
            del data[rng.randrange(len(data)) :]
        else:
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        file.write_bytes(bytes(data))
        return _resume_and_compare(run, refs.single, seen, expect="unusable")

    scenario.__doc__ = f"Kill after 2+ checkpoints, {kind} newest file, --resume falls back."
    return scenario


def nan_loss(work: Path, refs: References, rng: random.Random) -> Drill:
    """A NaN loss at a random step (in process); guard.nonfinite=skip leaves the weights."""
    from moesaic.train.config import apply_overrides
    from moesaic.train.recipes import get_recipe
    from moesaic.train.trainer import Trainer

    trainer = Trainer(apply_overrides(get_recipe("lm-moe-test"), SETTINGS), work, progress=False)
    bad, real = rng.randint(1, STEPS), trainer.model.loss
    trainer.model.loss = lambda x, y: real(x, y) * (math.nan if trainer.step + 1 == bad else 1.0)
    trainer.fit(max_steps=bad - 1)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.fit(max_steps=1)
    unchanged = all(torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())
    trainer.fit()
    rows, weights = outcome(work)
    skipped = [r["step"] for r in rows if r.get("skipped")]
    finite = all(bool(torch.isfinite(w).all()) for w in weights.values())
    ok = unchanged and finite and skipped == [bad] and trainer.step == STEPS
    return Drill(ok, 1, 0, "" if ok else f"skipped={skipped} unchanged={unchanged}")


def rank_kill(work: Path, refs: References, rng: random.Random) -> Drill:
    """SIGKILL one of 2 torchrun ranks at a random step; torchrun restarts, --auto-resume."""
    reference = refs.torchrun
    run = work / "run"
    proc = start(torchrun_command(run, restarts=1))
    rank = rng.randint(0, 1)
    seen = kill_at_step(
        proc, run, rng.randint(EVERY + 1, STEPS - 1), lambda: worker_pid(proc.pid, rank)
    )
    good = _newest_good_step(run)
    done = _finish(proc)
    ok = done.returncode == 0 and same_outcome(run, reference)
    return Drill(ok, seen - good, 0, "" if ok else f"rc={done.returncode} {done.stderr[-300:]}")


def _signal(signum: int) -> Callable[[Path, References, random.Random], Drill]:
    name = signal.Signals(signum).name

    def scenario(work: Path, refs: References, rng: random.Random) -> Drill:
        run = work / "run"
        proc = start(train_command(run))
        try:
            wait_for_step(proc, run, rng.randint(1, STEPS - 2))
        except RuntimeError:
            return Drill(False, 0, 0, f"the run ended first (rc={proc.returncode})")
        time.sleep(rng.uniform(0, 0.05))  # anywhere in a step, an evaluation or a save
        proc.send_signal(signum)
        done = _finish(proc)
        last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""
        # In training: the step boundary's checkpoint; after it (summary): nothing in flight.
        said = "saved; continue with --resume" in last or "newest checkpoint, if any" in last
        if done.returncode != 128 + signum or not said:
            return Drill(False, 0, 0, f"rc={done.returncode} {last[-200:]}")
        seen = logged_steps(run)
        return _resume_and_compare(run, refs.single, seen)

    scenario.__doc__ = f"{name} at a random moment: checkpoint at the step boundary, --resume."
    return scenario


def nonfinite_update(work: Path, refs: References, rng: random.Random) -> Drill:
    """An update that writes inf into a weight at a random step (in process): rolled back and
    replayed without it, ending equal to a run whose guard skipped that step; every checkpoint
    finite."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from moesaic.train.checkpoint import list_checkpoints, read_checkpoint

    bad = rng.randint(1, STEPS)
    poisoned = _in_process_trainer(work / "poisoned")

    def poison(optimizer, args, kwargs):
        if poisoned.step + 1 == bad and optimizer is poisoned.optimizer:
            with torch.no_grad():
                next(poisoned.model.parameters()).view(-1)[0] = math.inf

    handle = register_optimizer_step_post_hook(poison)
    try:
        poisoned.fit()
    finally:
        handle.remove()
    skipped = _in_process_trainer(work / "skipped")
    real = skipped.model.loss
    skipped.model.loss = lambda x, y: (
        real(x, y) * (math.nan if skipped.step + 1 == bad and skipped.model.training else 1.0)
    )
    skipped.fit()
    same = all(
        torch.equal(a, b)
        for a, b in zip(poisoned.model.state_dict().values(), skipped.model.state_dict().values())
    )
    finite = all(
        bool(torch.isfinite(w).all())
        for path in list_checkpoints(work / "poisoned" / "checkpoints")
        for w in read_checkpoint(path)[0].values()
    )
    rows = [json.loads(x) for x in (work / "poisoned" / "metrics.jsonl").read_text().splitlines()]
    rollbacks = [r for r in rows if r.get("event") == "rollback"]
    ok = same and finite and len(rollbacks) == 1 and poisoned.step == STEPS
    lost = bad - 1 - rollbacks[0]["to_step"] if rollbacks else 0
    return Drill(ok, lost, 0, "" if ok else f"same={same} finite={finite} rows={rollbacks}")


def _in_process_trainer(run_dir: Path, *settings: str, resume: bool = False):
    from moesaic.train.config import apply_overrides
    from moesaic.train.recipes import get_recipe
    from moesaic.train.trainer import Trainer

    cfg = apply_overrides(get_recipe("lm-moe-test"), [*SETTINGS, *settings])
    return Trainer(cfg, run_dir, progress=False, resume=resume)


def concurrent(work: Path, refs: References, rng: random.Random) -> Drill:
    """A second ``moesaic train`` (fresh, --resume or --auto-resume) on a run directory in use,
    at a random step: refused at once naming the first one's pid; the first run ends
    bit-identical to the reference. The first is paused (SIGSTOP) while the second runs, so it
    cannot finish before the second starts."""
    run = work / "run"
    first = start(train_command(run))
    try:
        wait_for_step(first, run, rng.randint(1, STEPS - 2))
    except RuntimeError:
        return Drill(False, 0, 0, f"the first run ended early (rc={first.returncode})")
    os.kill(first.pid, signal.SIGSTOP)
    try:
        flags = rng.choice([["--resume"], ["--auto-resume"], []])
        second = _finish(start(train_command(run, *flags)))
    finally:
        os.kill(first.pid, signal.SIGCONT)
    done = _finish(first)
    refused = second.returncode == 2 and f"in use by another process (pid {first.pid}," in (
        second.stderr
    )
    ok = refused and done.returncode == 0 and same_outcome(run, refs.single)
    note = "" if ok else f"second rc={second.returncode} {second.stderr[-200:]}"
    return Drill(ok, 0, 0, note)


# ``moesaic train`` whose N-th checkpoint save runs under a file size limit (``ulimit -f``):
# the save fails part-way through writing its files.
_SIZE_LIMITED = """
import resource, sys
import moesaic.train.trainer as trainer
n, calls, real = int(sys.argv[1]), [0], trainer.save_checkpoint
def save(*args, **kwargs):
    calls[0] += 1
    if calls[0] == n:
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
    return real(*args, **kwargs)
trainer.save_checkpoint = save
from moesaic.cli.train import main
sys.exit(main(sys.argv[2:]))
"""


def disk_full(work: Path, refs: References, rng: random.Random) -> Drill:
    """A save fails for want of space (file size limit) at the 2nd-4th checkpoint: one line,
    exit 1, nothing of it kept, the previous checkpoint intact; --resume ends bit-identical."""
    run = work / "run"
    nth = rng.randint(2, STEPS // EVERY)
    done = _finish(start([sys.executable, "-c", _SIZE_LIMITED, str(nth), *train_command(run)[4:]]))
    lines = done.stderr.strip().splitlines()
    want = f"step-{(nth - 1) * EVERY:06d} is intact"
    clean = not list((run / "checkpoints").glob(".tmp-*"))
    if done.returncode != 1 or "Traceback" in done.stderr or want not in lines[-1] or not clean:
        return Drill(False, 0, 0, f"rc={done.returncode} clean={clean} {done.stderr[-300:]}")
    return _resume_and_compare(run, refs.single, nth * EVERY)


def step_million(work: Path, refs: References, rng: random.Random) -> Drill:
    """Steps 999,990 to 1,000,010 in two sessions split at a random step (in process): pruning
    keeps, and resume picks, the numerically newest checkpoint; weights equal one session's."""
    from moesaic.train.checkpoint import list_checkpoints
    from moesaic.train.trainer import Trainer

    first, total = 999_990, 20
    settings = (f"train.steps={first + total}", "train.log_every=1000")

    def trainer(run_dir: Path, resume: bool = False) -> Trainer:
        t = _in_process_trainer(run_dir, *settings, resume=resume)
        if not resume:
            t.step = first  # as if resumed at 999,990: the checkpoint names cross 10^6
        return t

    whole = trainer(work / "whole")
    whole.fit()
    split = rng.randint(3, total - 3)
    part = trainer(work / "part")
    part.fit(max_steps=split)
    resumed = trainer(work / "part", resume=True)
    picked = resumed.step
    resumed.fit()
    names = [p.name for p in list_checkpoints(work / "part" / "checkpoints")]
    same = all(
        torch.equal(a, b)
        for a, b in zip(whole.model.state_dict().values(), resumed.model.state_dict().values())
    )
    ok = picked == first + split and names[-1] == "step-1000010" and same
    return Drill(ok, 0, 0, "" if ok else f"picked={picked} kept={names} same={same}")


SCENARIOS: dict[str, Callable[[Path, References, random.Random], Drill]] = {
    "sigkill-train": sigkill_train,
    "sigkill-save": sigkill_save,
    "sigint": _signal(signal.SIGINT),
    "sigterm": _signal(signal.SIGTERM),
    "truncated-ckpt": _damage("truncated"),
    "corrupted-ckpt": _damage("corrupted"),
    "nan-loss": nan_loss,
    "nonfinite-update": nonfinite_update,
    "concurrent-runs": concurrent,
    "disk-full": disk_full,
    "step-million": step_million,
    "rank-kill": rank_kill,
}


def table(results: dict[str, list[Drill]]) -> str:
    """The Markdown table: survived / total and the work each recovery lost."""
    lines = [
        "| scenario | survived / total | steps lost (mean, max) | checkpoint bytes lost (mean) |",
        "|---|---|---|---|",
    ]
    for name, drills in results.items():
        steps = [d.steps_lost for d in drills]
        lost = sum(d.bytes_lost for d in drills) / len(drills)
        lines.append(
            f"| {name} | {sum(d.survived for d in drills)} / {len(drills)} | "
            f"{sum(steps) / len(steps):.1f}, {max(steps)} | {lost:,.0f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="drills per scenario")
    parser.add_argument("--scenarios", nargs="+", choices=sorted(SCENARIOS), default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None, help="scratch directory (default tmp)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats={args.repeats} must be >= 1")
    import tempfile

    rng = random.Random(args.seed)
    names = args.scenarios or list(SCENARIOS)
    start_s = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        refs = References(Path(tmp))
        results: dict[str, list[Drill]] = {}
        for name in names:
            results[name] = []
            for i in range(args.repeats):
                drill = SCENARIOS[name](Path(tmp) / f"{name}-{i}", refs, rng)
                results[name].append(drill)
                status = "ok" if drill.survived else f"FAILED {drill.note}"
                print(f"{name} #{i + 1}: {status}", file=sys.stderr, flush=True)
    print(
        f"Fault drills: lm-moe-test, {STEPS} steps, checkpoint every {EVERY}, "
        f"{args.repeats} repeats, seed {args.seed}; torch {torch.__version__}, "
        f"1 thread per process; {time.perf_counter() - start_s:.0f} s\n"
    )
    print(table(results))
    return 0 if all(d.survived for ds in results.values() for d in ds) else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
