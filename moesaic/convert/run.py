"""Turn a trained dense LM run into an MoE run that continues training (``moesaic upcycle``)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

from moesaic.config import MoEConfig
from moesaic.convert.lm import UPCYCLED_MOE, upcycle_lm, upcycled_lm_config
from moesaic.train.config import apply_overrides
from moesaic.train.data import TOKENIZER_FILE
from moesaic.train.run import load_run
from moesaic.train.trainer import Trainer, evaluate

__all__ = ["upcycle_run", "PROVENANCE"]

PROVENANCE = "upcycled_from.json"


def upcycle_run(
    dense_dir: str | Path,
    out_dir: str | Path,
    *,
    moe: MoEConfig = UPCYCLED_MOE,
    noise: float = 0.0,
    seed: int | None = None,
    overrides: Sequence[str] = (),
    progress: bool = True,
) -> Trainer:
    """A ``Trainer`` for a new run in ``out_dir`` whose model is the dense run ``dense_dir``'s
    newest checkpoint, upcycled (``upcycle_lm``) into MoE layers ``moe`` describes, already saved
    as the run's step-0 checkpoint.
    ``out_dir/upcycled_from.json`` records the dense run and both models' validation loss at
    step 0.

    The new run keeps the dense run's data, tokenizer and training settings, with a fresh
    optimizer and schedule; ``overrides`` (``section.field=value``, as ``--set``) change them.
    ``trainer.fit()`` trains it; ``moesaic train --resume --run-dir OUT`` continues it later.
    """
    dense_dir, out_dir = Path(dense_dir), Path(out_dir)
    loaded = load_run(dense_dir)
    model = upcycled_lm_config(loaded.cfg.model, moe)
    cfg = dataclasses.replace(loaded.cfg, recipe=f"{loaded.cfg.recipe}-upcycled", model=model)
    cfg = apply_overrides(cfg, list(overrides))
    if (out_dir / "checkpoints").exists():
        raise FileExistsError(f"{out_dir} already holds a run; choose another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(dense_dir / TOKENIZER_FILE, out_dir / TOKENIZER_FILE)  # the same token ids
    trainer = Trainer(cfg, out_dir, progress=progress)
    vocab = loaded.model.cfg.vocab_size
    upcycled = upcycle_lm(
        loaded.model, dataclasses.replace(cfg.model, vocab_size=vocab), noise, seed
    )
    trainer.model.load_state_dict(upcycled.state_dict())
    trainer.save()
    record = {
        "dense_run": str(dense_dir),
        "dense_step": loaded.step,
        "noise": noise,
        "seed": seed,
        # equal when the router's weights sum to one and noise is 0: the upcycling check
        "dense_val_loss": evaluate(loaded.model, trainer.val_batches),
        "upcycled_val_loss_step0": evaluate(trainer.model, trainer.val_batches),
    }
    (out_dir / PROVENANCE).write_text(json.dumps(record, indent=1))
    return trainer
