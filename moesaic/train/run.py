"""Open a finished (or interrupted) run directory: its config, tokenizer and newest weights."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from moesaic.data import tokenizer_from_json
from moesaic.models.lm import MoELM
from moesaic.train.checkpoint import check_fits, resumable_checkpoint
from moesaic.train.config import RunConfig, config_from_dict
from moesaic.train.data import TOKENIZER_FILE

__all__ = ["LoadedRun", "load_run"]


@dataclasses.dataclass
class LoadedRun:
    cfg: RunConfig
    model: MoELM
    tokenizer: object
    step: int


def load_run(run_dir: Path) -> LoadedRun:
    """Rebuild the model of ``run_dir`` and load its newest checkpoint that verifies (saying on
    stderr which newer ones it skipped)."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{run_dir} is not a run directory: {config_path} is missing")
    cfg = config_from_dict(RunConfig, json.loads(config_path.read_text()))
    tokenizer = tokenizer_from_json((run_dir / TOKENIZER_FILE).read_text())
    model = MoELM(dataclasses.replace(cfg.model, vocab_size=tokenizer.vocab_size))
    found = resumable_checkpoint(run_dir / "checkpoints", _say)
    if found is None:
        raise FileNotFoundError(f"{run_dir}/checkpoints holds no checkpoint yet")
    path, weights, state = found
    check_fits(model.state_dict(), weights, path / "model.safetensors")
    model.load_state_dict(weights)
    model.eval()
    return LoadedRun(cfg=cfg, model=model, tokenizer=tokenizer, step=int(state["step"]))


def _say(message: str) -> None:
    print(f"moesaic: {message}", file=sys.stderr, flush=True)
