"""Image runs end to end through the one trainer: the one-minute digits recipe beats 80%, the
capacity curve at the trained ratio equals the plain evaluation, runs resume bit for bit,
contrastive pre-training feeds a linear probe, Sparse-MLP trains, and reports draw the
class-by-expert map."""

from __future__ import annotations

import json

import pytest
import torch

from moesaic.cli.main import main
from moesaic.cli.vision import capacity_curve
from moesaic.train.config import apply_overrides
from moesaic.train.recipes import get_recipe
from moesaic.train.trainer import Trainer
from moesaic.train.vision import load_vision_run
from tests.cases import without_timings

ONE_THREAD = ["--set", "train.threads=1"]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("digits") / "run"
    threads = torch.get_num_threads()
    code = main(["train", "--recipe", "vmoe-digits", "--run-dir", str(run), "--no-progress",
                 *ONE_THREAD])  # fmt: skip
    torch.set_num_threads(threads)
    assert code == 0
    return run


def test_the_one_minute_digits_recipe_beats_80_percent(digits_run, cli):
    test = json.loads((digits_run / "test.json").read_text())
    assert test["step"] == 600 and test["val_acc"] > 0.80
    code, stdout, stderr = cli("eval", "--run", str(digits_run))
    assert code == 0, stderr
    assert f"test loss {test['val_loss']:.4f}, accuracy {test['val_acc']:.4f}" in stdout


def test_capacity_curve_at_the_trained_ratio_equals_the_plain_evaluation(digits_run, cli):
    test = json.loads((digits_run / "test.json").read_text())
    trained = get_recipe("vmoe-digits").vision.vit.moe.capacity_factor
    rows = capacity_curve(digits_run, [trained, 1.0, 0.25, 1000.0])
    by = {(r["policy"], r["capacity_ratio"]): r for r in rows}
    assert by["priority", trained]["accuracy"] == test["val_acc"]  # the model's own policy
    # ratio 1.0 equals an evaluation configured with that inference capacity
    run = load_vision_run(digits_run)
    cfg = apply_overrides(run.cfg, ["vision.eval_capacity_factor=1.0"])
    run.task.vision = cfg.vision
    plain = run.task.evaluate(run.model, run.task.batches("test"))
    assert by["priority", 1.0]["accuracy"] == plain["val_acc"]
    # nothing is dropped at a huge ratio, whatever the order; a quarter keeps about a quarter
    assert by["priority", 1000.0]["processed"] == by["position", 1000.0]["processed"] == 1.0
    assert by["priority", 1000.0]["accuracy"] == by["position", 1000.0]["accuracy"]
    assert 0.2 < by["priority", 0.25]["processed"] <= 0.26
    code, stdout, stderr = cli("vision", "capacity-curve", "--run", str(digits_run),
                               "--ratios", "1,0.5")  # fmt: skip
    assert code == 0, stderr
    assert (digits_run / "capacity_curve.png").exists()
    assert len(json.loads((digits_run / "capacity_curve.json").read_text())) == 4
    code, _, stderr = cli("vision", "capacity-curve", "--run", str(digits_run), "--ratios", "0")
    assert code == 2 and "--ratios='0' must be numbers > 0" in stderr


def _digits(*overrides):
    sets = ["train.steps=12", "train.eval_every=6", "train.checkpoint_every=6",
            "train.log_every=1", "train.threads=1", *overrides]  # fmt: skip
    return apply_overrides(get_recipe("vmoe-digits"), sets)


def test_an_image_run_resumes_bit_identically(tmp_path):
    cfg = _digits("vision.augment=crop+flip")
    full = Trainer(cfg, tmp_path / "full", progress=False)
    full.fit()
    part = Trainer(cfg, tmp_path / "part", progress=False)
    part.fit(max_steps=6)
    resumed = Trainer(cfg, tmp_path / "part", progress=False, resume=True)
    assert resumed.step == 6
    resumed.fit()
    assert without_timings(tmp_path / "part") == without_timings(tmp_path / "full")
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_contrastive_pretraining_feeds_a_linear_probe(tmp_path, cli):
    run = tmp_path / "simclr"
    cfg = _digits("vision.objective=contrastive", "train.steps=30")
    trainer = Trainer(cfg, run, progress=False)
    head = trainer.model.backbone.head.weight.clone()
    trainer.fit()
    assert torch.equal(trainer.model.backbone.head.weight, head)  # the classifier is unused
    # views find their partner among the 2B - 1 others far above chance (1 / 127)
    assert trainer.evals[-1]["val_acc"] > 5 / 127
    code, stdout, stderr = cli("vision", "probe", "--run", str(run), "--dataset", "digits")
    assert code == 0, stderr
    probe = json.loads((run / "probe.json").read_text())
    assert probe["accuracy"] > 0.5 and probe["test_images"] == 359
    code, _, stderr = cli("vision", "probe", "--run", str(run), "--dataset", "mnist5k")
    assert code == 2 and "--dataset mnist5k has 28x28 images" in stderr


def test_sparse_mlp_trains_and_the_report_maps_classes_to_experts(tmp_path, cli):
    cfg = apply_overrides(
        get_recipe("sparse-mlp-fashion"),
        ["vision.dataset=digits", "vision.augment=none", "vision.mixer.patch_size=2",
         "vision.mixer.rerep_patches=32", "vision.mixer.rerep_channels=32",
         "data.batch_size=32", "data.eval_batches=2", "train.steps=10", "train.eval_every=5",
         "train.log_every=1", "train.threads=1"],
    )  # fmt: skip
    trainer = Trainer(cfg, tmp_path / "smlp", progress=False)
    result = trainer.fit()
    assert torch.isfinite(torch.tensor(result.val_loss))
    assert len(trainer.model.moe_layers()) == 4  # MoE_s and MoE_c in the last two blocks
    code, _, stderr = cli("report", str(tmp_path / "smlp"))
    assert code == 0, stderr
    assert (tmp_path / "smlp" / "report_affinity.png").exists()
    affinity = json.loads((tmp_path / "smlp" / "affinity.json").read_text())
    assert affinity["labels"] == [str(i) for i in range(10)]
