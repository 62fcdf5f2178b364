"""Open a finished (or interrupted) run directory: its config, tokenizer and newest weights."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from moesaic.data import tokenizer_from_json
from moesaic.models.lm import MoELM
from moesaic.models.lstm import LSTMMoE
from moesaic.train.checkpoint import (
    load_newest_fitting,
    resumable_checkpoint,
    save_checkpoint,
    write_atomic,
)
from moesaic.train.config import RunConfig, config_from_dict, config_to_dict
from moesaic.train.data import TOKENIZER_FILE
from moesaic.train.tasks import build_model

__all__ = ["LoadedRun", "load_run", "read_run_config", "write_run"]


@dataclasses.dataclass
class LoadedRun:
    cfg: RunConfig
    model: MoELM | LSTMMoE  # LSTMMoE for a run with an ``lstm`` section
    tokenizer: object
    step: int


def load_run(run_dir: Path) -> LoadedRun:
    """Rebuild the model of ``run_dir`` and load its newest checkpoint that verifies (saying on
    stderr which newer ones it skipped)."""
    run_dir = Path(run_dir)
    cfg = config_from_dict(RunConfig, read_run_config(run_dir))
    tokenizer = tokenizer_from_json((run_dir / TOKENIZER_FILE).read_text())
    model = build_model(cfg, tokenizer.vocab_size)
    state = load_newest_fitting(model, run_dir / "checkpoints", _say)
    if state is None:
        raise FileNotFoundError(f"{run_dir}/checkpoints holds no checkpoint yet")
    model.eval()
    return LoadedRun(cfg=cfg, model=model, tokenizer=tokenizer, step=int(state["step"]))


def write_run(run_dir: Path, cfg: RunConfig, model: MoELM, tokenizer: object, step: int) -> Path:
    """Write ``model`` as a finished run at ``step`` (config.json, tokenizer.json, an empty
    metrics.jsonl and one checkpoint) that ``load_run`` and every command reading runs accept;
    for models made from a run rather than trained (``moesaic extract``)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(config_to_dict(cfg), indent=1)
    write_atomic(run_dir / "config.json", text)
    write_atomic(run_dir / TOKENIZER_FILE, tokenizer.to_json())
    write_atomic(run_dir / "metrics.jsonl", "")
    state = {"step": step, "train_s": 0.0, "evals": [], "config": text}
    return save_checkpoint(run_dir / "checkpoints", step, model, state)


def read_run_config(run_dir: Path) -> dict:
    """The run's config as a dict (see ``saved_config``); says on stderr when it falls back."""
    path = Path(run_dir) / "config.json"
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return data
    except FileNotFoundError:
        problem = "is missing"
    except (OSError, ValueError) as err:
        problem = f"is unreadable ({type(err).__name__}: {' '.join(str(err).split())[:120]})"
    found = None
    if (Path(run_dir) / "checkpoints").is_dir():
        found = resumable_checkpoint(Path(run_dir) / "checkpoints", lambda _: None)
    if found is None or "config" not in found[2]:
        raise FileNotFoundError(
            f"{run_dir} is not a run directory: {path} {problem} and no checkpoint holds a copy"
        )
    _say(f"{path} {problem}; using the copy in checkpoint {found[0].name}")
    return json.loads(found[2]["config"])


def _say(message: str) -> None:
    print(f"moesaic: {message}", file=sys.stderr, flush=True)
