"""``--set train.checkpoint_activations=true`` trains the same run: the losses, evaluations and
weights of a run with recomputed activations equal the run that stores them."""

from __future__ import annotations

import pytest
import torch

from moesaic.train.config import apply_overrides
from moesaic.train.recipes import get_recipe
from moesaic.train.trainer import Trainer
from tests.cases import without_timings


def _train(run_dir, *extra):
    cfg = apply_overrides(get_recipe("lm-moe-test"), ["train.steps=10", "train.threads=1", *extra])
    trainer = Trainer(cfg, run_dir, progress=False)
    trainer.fit()
    return trainer


def test_a_run_with_checkpointed_activations_equals_the_stored_run(tmp_path):
    plain = _train(tmp_path / "plain")
    ckpt = _train(tmp_path / "ckpt", "train.checkpoint_activations=true")
    assert ckpt.model.checkpoint_activations and not plain.model.checkpoint_activations
    rows = [without_timings(t.run_dir) for t in (plain, ckpt)]
    assert len(rows[0]) > 0
    for a, b in zip(*rows):
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], float):
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
            else:
                assert b[key] == a[key], key
    for (name, p), q in zip(plain.model.named_parameters(), ckpt.model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)
