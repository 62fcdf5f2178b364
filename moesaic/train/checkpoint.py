"""Checkpoints that resume exactly and never damage the previous one.

Layout of a run directory::

    run/
      config.json                 the RunConfig (a record; the run itself is Python)
      metrics.jsonl               one JSON object per logged step and per evaluation
      checkpoints/step-000250/    model.safetensors, state.pt, manifest.json
      checkpoints/latest          name of the newest complete checkpoint

A checkpoint is written into a temporary directory, every file fsynced, then renamed into place
and only then named in ``latest``: a save interrupted at any point leaves the previous checkpoint
and ``latest`` untouched. Weights are safetensors; the optimizer, scheduler, RNG and data-cursor
state is plain tensors, numbers and strings loaded with ``torch.load(weights_only=True)``, so a
checkpoint cannot execute code. ``manifest.json`` holds each file's SHA-256, checked on load.
``resumable_checkpoint`` walks back from ``latest`` to the newest checkpoint that verifies, saying
which ones it skipped and why, so a corrupted newest checkpoint costs ``checkpoint_every`` steps,
not the run.

An FSDP run (``parallel.shard`` > 0) writes its tensors instead as ``dcp/``, a
``torch.distributed.checkpoint`` directory in which each rank wrote its own shard
(``moesaic.parallel.dcp``); ``state.pt`` and ``manifest.json`` (format ``dcp``, every file's
SHA-256) are as above and the same atomic rename publishes the whole directory. Reading such a
checkpoint gives ``ShardedWeights``: the saved shapes at once, the full tensors on first access
(one process), or each rank's slices through ``moesaic.parallel.dcp.load_state``.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "read_checkpoint",
    "check_fits",
    "latest_checkpoint",
    "resumable_checkpoint",
    "load_newest_fitting",
    "CheckpointError",
    "CheckpointWriteError",
    "NonFiniteWeightsError",
    "checkpoint_step",
    "list_checkpoints",
    "remove_stale_files",
    "write_atomic",
    "save_sharded_checkpoint",
    "ShardedWeights",
]

WEIGHTS, STATE, MANIFEST, LATEST = "model.safetensors", "state.pt", "manifest.json", "latest"
SHARDS = "dcp"  # the torch.distributed.checkpoint directory of a sharded checkpoint
_STEP_NAME = re.compile(r"step-(\d+)")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupted; the message names the file.

    The message is one line: wrapped errors from torch or safetensors can span several.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(line.strip() for line in message.splitlines() if line.strip()))


class CheckpointWriteError(CheckpointError):
    """A save failed (disk full, file size limit, permissions); nothing of it was kept and the
    previous checkpoint is untouched."""


class NonFiniteWeightsError(CheckpointError):
    """Weights holding inf or NaN were refused: a checkpoint only ever holds a finite state."""


def checkpoint_step(path: Path) -> int | None:
    """The step number of a ``step-N`` checkpoint directory name (None for any other name)."""
    match = _STEP_NAME.fullmatch(Path(path).name)
    return int(match.group(1)) if match else None


def list_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """The ``step-N`` directories, oldest first, ordered by N as a number (so step-1000000 comes
    after step-999999, which text order gets wrong)."""
    found = [p for p in Path(checkpoint_dir).glob("step-*") if p.is_dir()]
    return sorted((p for p in found if checkpoint_step(p) is not None), key=checkpoint_step)


def save_checkpoint(
    checkpoint_dir: Path,
    step: int,
    weights: nn.Module | dict[str, torch.Tensor],
    state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write ``step-XXXXXX`` atomically, point ``latest`` at it, keep the newest ``keep``.

    ``weights`` is a model or a state dict (e.g. ``ms.parallel.full_state_dict``'s). Weights
    holding inf or NaN are refused (``NonFiniteWeightsError``) before anything is written; a
    failed write (disk full, ``ulimit -f``) raises ``CheckpointWriteError`` after removing what
    it had written, leaving every earlier checkpoint and ``latest`` as they were."""
    if isinstance(weights, nn.Module):
        weights = weights.state_dict()
    bad = _nonfinite(weights)
    if bad:
        raise NonFiniteWeightsError(
            f"step {step}: refusing to checkpoint non-finite weights ({', '.join(bad[:3])}"
            + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
            + ")"
        )
    final = checkpoint_dir / f"step-{step:06d}"
    try:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=checkpoint_dir))
    except OSError as err:
        raise CheckpointWriteError(f"cannot write checkpoint {final}: {_os_reason(err)}") from None
    try:
        save_file(_untie(weights), tmp / WEIGHTS, metadata={"step": str(step)})
        torch.save(state, tmp / STATE)
        _seal(tmp, final, step, [WEIGHTS, STATE])
    except Exception as err:  # OSError, and torch's / safetensors' wrappers of a failed write
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(final, _os_reason(err)) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _prune(checkpoint_dir, keep)
    return final


def _nonfinite(weights: dict[str, torch.Tensor]) -> list[str]:
    """Names of floating-point tensors holding inf or NaN (this rank's shard of a DTensor)."""
    from moesaic.parallel.grads import local_tensor

    return [
        name
        for name, t in weights.items()
        if t.is_floating_point() and not local_tensor(t).isfinite().all()
    ]


def _write_error(final: Path, reason: str) -> CheckpointWriteError:
    """The one-line error of a save of ``final`` that failed and was removed."""
    previous = _named_by_latest(final.parent)
    kept = (
        f"{previous.name} is intact"
        if previous is not None and previous.is_dir() and previous != final
        else "no earlier checkpoint exists"
    )
    return CheckpointWriteError(
        f"cannot write checkpoint {final} ({reason}); nothing of it was kept and {kept}"
    )


def _os_reason(err: Exception) -> str:
    if isinstance(err, OSError) and err.strerror:
        return err.strerror + (f": {err.filename}" if err.filename else "")
    return " ".join(f"{type(err).__name__}: {err}".split())


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The checkpoint named by ``latest`` (None when the run has none yet)."""
    pointer = checkpoint_dir / LATEST
    if not pointer.exists():
        return None
    path = checkpoint_dir / pointer.read_text().strip()
    if not path.is_dir():
        raise CheckpointError(f"{pointer} names {path.name}, which does not exist")
    return path


def resumable_checkpoint(
    checkpoint_dir: Path,
    log: Callable[[str], None] = print,
    check: Callable[[dict[str, torch.Tensor], dict[str, Any]], None] | None = None,
) -> tuple[Path, dict[str, torch.Tensor], dict[str, Any]] | None:
    """The newest checkpoint that verifies, as (path, weights, state); None when there is none.

    Tries every ``step-*`` newest first by step number (a save killed after its rename but
    before ``latest`` was updated left a complete, newer checkpoint); each one skipped is
    reported through ``log`` with the reason, and so is a ``latest`` that names no checkpoint.
    ``check(weights, state)`` may refuse a checkpoint that verifies but does not fit (raising
    ``CheckpointError``, e.g. ``check_fits``): the walk then goes on to the previous one. Raises
    ``CheckpointError`` (naming every failure) when checkpoints exist but none is usable."""
    checkpoint_dir = Path(checkpoint_dir)
    named = _named_by_latest(checkpoint_dir)
    pointer = checkpoint_dir / LATEST
    if pointer.exists() and (named is None or not named.is_dir()):
        try:
            text = pointer.read_bytes()[:60].decode(errors="replace").strip()
        except OSError as err:
            text = f"(unreadable: {err.strerror})"
        log(f"{pointer} names {text!r}, which is not a checkpoint here; ignoring it")
    candidates = list_checkpoints(checkpoint_dir)[::-1]
    failures = []
    for path in candidates:
        try:
            weights, state = read_checkpoint(path)
            if check is not None:
                check(weights, state)
        except CheckpointError as err:
            failures.append(f"{path.name}: {err}")
            log(f"checkpoint {path.name} is unusable ({err}); trying the previous one")
            continue
        if failures:
            log(f"using the previous good checkpoint {path.name} (step {state['step']})")
        return path, weights, state
    if failures:
        raise CheckpointError(
            f"no checkpoint in {checkpoint_dir} is usable: " + "; ".join(failures)
        )
    return None


def load_newest_fitting(
    model: nn.Module, checkpoint_dir: Path, log: Callable[[str], None] = print
) -> dict[str, Any] | None:
    """Load into ``model`` the newest checkpoint of ``checkpoint_dir`` that verifies and whose
    weights fit it (``resumable_checkpoint`` with ``check_fits``); its state, or None when no
    checkpoint does. Skipped checkpoints are reported through ``log``."""
    expected = model.state_dict()
    found = resumable_checkpoint(
        checkpoint_dir,
        log,
        check=lambda weights, state: check_fits(expected, weights, Path(WEIGHTS)),
    )
    if found is None:
        return None
    model.load_state_dict(found[1])
    return found[2]


def _named_by_latest(checkpoint_dir: Path) -> Path | None:
    pointer = checkpoint_dir / LATEST
    try:
        name = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    valid = "/" not in name and checkpoint_step(Path(name)) is not None
    return checkpoint_dir / name if valid else None


def save_sharded_checkpoint(
    checkpoint_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    state: dict[str, Any],
    groups,
    keep: int = 2,
) -> Path | None:
    """``save_checkpoint`` for a sharded model (collective over every rank of ``groups``): each
    rank writes its shard of the weights and optimizer moments through DCP into the temporary
    directory; rank 0 then writes ``state``, the manifest, renames and updates ``latest``.

    The guarantees are ``save_checkpoint``'s: non-finite weights on any rank are refused before
    anything is written, and a failure on any rank removes the whole temporary directory and
    raises ``CheckpointWriteError`` on every rank, leaving earlier checkpoints untouched.
    Returns the checkpoint's path on rank 0, None elsewhere."""
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    from moesaic.parallel.dcp import save_state

    bad_anywhere = _first_error(", ".join(_nonfinite(model.state_dict())[:3]) or None, groups)
    if bad_anywhere is not None:
        raise NonFiniteWeightsError(
            f"step {step}: refusing to checkpoint non-finite weights ({bad_anywhere})"
        )
    final = checkpoint_dir / f"step-{step:06d}"
    tmp = checkpoint_dir / f".tmp-{final.name}-sharded"  # one name every rank knows
    error = None
    if groups.is_main:
        try:
            checkpoint_dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        except OSError as err:
            error = _os_reason(err)
    error = _first_error(error, groups)
    if error is None:
        try:
            save_state(tmp / SHARDS, model, optimizer, groups)
        except CheckpointException as err:  # DCP raises any rank's failure on every rank
            error = "; ".join(f"rank {r}: {_os_reason(e)}" for r, (e, _) in err.failures.items())
        except Exception as err:
            error = _os_reason(err)
        error = _first_error(error, groups)
    if error is None and groups.is_main:
        try:
            _publish(tmp, final, step, state)
        except Exception as err:
            error = _os_reason(err)
    error = _first_error(error, groups)
    if error is not None:
        if groups.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(final, error)
    if not groups.is_main:
        return None
    _prune(checkpoint_dir, keep)
    return final


def _publish(tmp: Path, final: Path, step: int, state: dict[str, Any]) -> None:
    """Rank 0's part of a sharded save: ``state.pt``, then ``_seal`` over every file."""
    torch.save(state, tmp / STATE)
    _fsync(tmp / SHARDS)
    names = [STATE] + sorted(f"{SHARDS}/{p.name}" for p in (tmp / SHARDS).iterdir())
    _seal(tmp, final, step, names, format=SHARDS)


def _seal(tmp: Path, final: Path, step: int, names: list[str], **fields: str) -> None:
    """Write the manifest of ``names`` (files in ``tmp``), fsync everything, rename ``tmp`` to
    ``final`` and point ``latest`` at it."""
    manifest = {name: _sha256(tmp / name) for name in names}
    (tmp / MANIFEST).write_text(json.dumps({"step": step, **fields, "sha256": manifest}, indent=1))
    for name in (*names, MANIFEST):
        _fsync(tmp / name)
    _fsync(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(final.parent)
    write_atomic(final.parent / LATEST, final.name)


def _first_error(error: str | None, groups) -> str | None:
    """Any rank's error (the lowest rank's), on every rank: all ranks fail a save together."""
    if groups is None or not groups.distributed:
        return error
    import torch.distributed as dist

    errors: list[str | None] = [None] * groups.world_size
    dist.all_gather_object(errors, error)
    return next((e for e in errors if e is not None), None)


class ShardedWeights(Mapping):
    """The weights of a sharded (DCP) checkpoint: ``shapes`` from its metadata; the full
    single-process tensors are read on first access to a tensor."""

    def __init__(self, directory: Path) -> None:
        from moesaic.parallel.dcp import saved_shapes

        self.directory = Path(directory)
        try:
            self.shapes = saved_shapes(self.directory)
        except Exception as err:
            raise CheckpointError(
                f"{self.directory}/.metadata is not valid DCP metadata: {err}"
            ) from None
        self._full: dict[str, torch.Tensor] | None = None

    def __getitem__(self, name: str) -> torch.Tensor:
        if self._full is None:
            from moesaic.parallel.dcp import load_full_weights

            self._full = load_full_weights(self.directory)
        return self._full[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Verify every file of ``path`` against its manifest; return (weights, state).

    Any problem (missing, truncated, corrupted or unsafe file) raises ``CheckpointError`` naming
    the file; nothing in a checkpoint is ever executed."""
    manifest_step, manifest = _read_manifest(path / MANIFEST)
    for name, digest in manifest.items():
        file = path / name
        if not file.is_file() or _sha256(file) != digest:
            raise CheckpointError(f"{file} is missing or corrupted (SHA-256 does not match)")
    if WEIGHTS not in manifest:  # sharded: state.pt and the DCP directory
        state = _load_state(path / STATE)
        if str(state["step"]) != str(manifest_step):
            raise CheckpointError(
                f"{path} mixes files of different steps (state step {state['step']}, "
                f"manifest step {manifest_step})"
            )
        return ShardedWeights(path / SHARDS), state
    try:
        with safe_open(path / WEIGHTS, framework="pt") as f:
            weights_step = (f.metadata() or {}).get("step")
            weights = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as err:  # safetensors raises its own error types for malformed headers
        raise CheckpointError(f"{path / WEIGHTS} is not a valid safetensors file: {err}") from None
    state = _load_state(path / STATE)
    # The three records of the step must agree: a manifest recomputed over one checkpoint's
    # weights and another's state verifies, but is not a checkpoint that ever existed.
    steps = {
        "weights metadata": weights_step,
        "state": str(state["step"]),
        "manifest": str(manifest_step),
    }
    if weights_step is not None and len(set(steps.values())) > 1:
        shown = ", ".join(f"{k} step {v}" for k, v in steps.items())
        raise CheckpointError(f"{path} mixes files of different steps ({shown})")
    return weights, state


def _read_manifest(manifest_path: Path) -> tuple[object, dict[str, str]]:
    """(the step it records, file name -> SHA-256)."""
    if not manifest_path.is_file():
        raise CheckpointError(f"{manifest_path} is missing: the checkpoint is incomplete")
    try:
        data = json.loads(manifest_path.read_bytes())
        manifest = data["sha256"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{manifest_path} is unreadable: {err!r}") from None
    if not isinstance(manifest, dict) or not all(isinstance(d, str) for d in manifest.values()):
        raise CheckpointError(f"{manifest_path} is malformed: it must map file names to digests")
    if data.get("format") == SHARDS:
        shards = [n for n in manifest if n != STATE]
        if (
            STATE not in manifest
            or f"{SHARDS}/.metadata" not in manifest
            or not all(re.fullmatch(rf"{SHARDS}/\.?[\w.]+", n) and ".." not in n for n in shards)
        ):
            raise CheckpointError(
                f"{manifest_path} is malformed: a sharded checkpoint lists {STATE}, "
                f"{SHARDS}/.metadata and its shard files"
            )
        return data.get("step"), manifest
    if set(manifest) != {WEIGHTS, STATE}:
        raise CheckpointError(
            f"{manifest_path} is malformed: it must map exactly {WEIGHTS} and {STATE} to digests"
        )
    return data.get("step"), manifest


def _load_state(file: Path) -> dict[str, Any]:
    try:
        state = torch.load(file, weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message is a page of advice in several formats; name the refused global.
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        reason = f"refused global {found.group(1)}" if found else type(err).__name__
        raise CheckpointError(
            f"{file} is refused: it holds more than tensors and plain data ({reason})"
        ) from None
    except Exception as err:  # truncated zip, bad header, ...: whatever torch raises
        raise CheckpointError(f"{file} cannot be read: {type(err).__name__}: {err}") from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{file} does not hold a training state (a dict with 'step')")
    return state


def load_checkpoint(path: Path, model: nn.Module) -> dict[str, Any]:
    """Verify ``path``'s files, load the weights into ``model`` and return the saved state."""
    weights, state = read_checkpoint(path)
    check_fits(model.state_dict(), weights, path / WEIGHTS)
    model.load_state_dict(weights)
    return state


def _untie(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # state_dict keeps tied weights once per name; safetensors refuses shared storage, so clone
    # the second name of each tie (load_state_dict re-ties them).
    seen: set[int] = set()
    out = {}
    for name, t in weights.items():
        ptr = t.untyped_storage().data_ptr()
        out[name] = t.detach().clone().contiguous() if ptr in seen else t.detach().contiguous()
        seen.add(ptr)
    return out


def check_fits(
    expected: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], file: Path
) -> None:
    """Raise one CheckpointError listing every missing, unexpected or mis-shaped tensor."""
    if isinstance(weights, ShardedWeights):  # the saved shapes, no tensor read
        shapes = weights.shapes
    else:
        shapes = {k: v.shape for k, v in weights.items()}
    problems = [f"missing {k}" for k in expected if k not in shapes]
    problems += [f"unexpected {k}" for k in shapes if k not in expected]
    problems += [
        f"{k}: saved {tuple(shape)}, model has {tuple(expected[k].shape)}"
        for k, shape in shapes.items()
        if k in expected and shape != expected[k].shape
    ]
    if problems:
        raise CheckpointError(f"{file} does not fit the model: " + "; ".join(problems))


def _prune(checkpoint_dir: Path, keep: int) -> None:
    # Also the temporary directories of saves that were killed (SIGKILL skips the cleanup):
    # only one process writes a run's checkpoints (the trainer holds moesaic.train.runlock).
    done = list_checkpoints(checkpoint_dir)
    for old in done[:-keep] + list(checkpoint_dir.glob(".tmp-step-*")):
        shutil.rmtree(old, ignore_errors=True)


def remove_stale_files(run_dir: Path) -> list[Path]:
    """Remove what killed processes left in ``run_dir``: temporary checkpoint directories
    (``checkpoints/.tmp-step-*``) and temporary files of atomic writes (``.NAME.PID.tmp``).
    Call it only while holding the run's lock (``moesaic.train.runlock``): then no other
    process is writing them. Returns what was removed."""
    run_dir = Path(run_dir)
    stale = list((run_dir / "checkpoints").glob(".tmp-step-*"))
    stale += [p for d in (run_dir, run_dir / "checkpoints") for p in d.glob(".*.tmp")]
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return stale


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so readers see the old file or the whole new one, never a part
    (a temporary file unique to this process, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync(path.parent)
