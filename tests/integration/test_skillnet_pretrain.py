"""Sparse pretraining end to end: its data never holds a task's val / test input, it learns,
it leaves the model's parameters as they were, and compare's workers change no result."""

import numpy as np
import pytest
import torch

import moesaic as ms
from moesaic import skillnet as sk
from moesaic.skillnet.compare import compare, train_one
from moesaic.skillnet.data import decode_bytes


@pytest.fixture
def smoke(skillnet_smoke):
    return skillnet_smoke


def _rows(x: torch.Tensor) -> set[bytes]:
    return {bytes(r.numpy().tobytes()) for r in x.reshape(x.shape[0], -1)}


def test_pretraining_data_holds_no_val_or_test_input(smoke):
    data, pre = smoke
    texts = {decode_bytes(r) for r in pre.inputs["text"].numpy()}
    for split in ("val", "test"):
        glosses = {decode_bytes(r) for r in data["text_cls"].splits[split]["inputs"].numpy()}
        assert glosses and not glosses & texts
        for modality, task, field in (
            ("code", "t2c", "item"),
            ("video", "t2v", "item"),
            ("sound", "sound_cls", "inputs"),
            ("image", "t2i_en", "item"),
        ):
            held = _rows(data[task].splits[split][field])
            assert not held & _rows(pre.inputs[modality]), (modality, split)
    # the tasks' train inputs are in it, unlabelled
    assert _rows(data["t2v"].splits["train"]["item"]) <= _rows(pre.inputs["video"])
    for lang in ("en", "zh"):
        p = pre.pairs[lang]
        assert p["query"].shape[0] == p["item"].shape[0] == p["labels"].shape[0]
        assert p["item"].shape[1:] == (32, 32)
    zh = {decode_bytes(r) for r in pre.pairs["zh"]["query"].numpy()}
    assert "一张外套的照片" in zh and any("苹果" in t for t in zh)


def test_pretraining_learns_and_keeps_the_models_parameters(skillnet_pretrained):
    state, history, before = skillnet_pretrained  # 30 steps of batch 8 (conftest.py)
    objectives = ["mlm/text", "mlm/code", "mim/image", "mim/video", "mfm/sound", "itc/en", "itc/zh"]
    assert set(history[0]) >= {f"loss/{o}" for o in objectives}
    for key in ("loss/mlm/text", "loss/mlm/code"):  # byte prediction starts near ln 256 = 5.5
        assert history[0][key] > 5.0 and np.mean([h[key] for h in history[-10:]]) < 4.0, key
    assert {k: v.shape for k, v in state.items()} == before


def test_compare_workers_give_the_serial_results(smoke, tmp_path, one_thread):
    data, pre = smoke
    data = {t: data[t] for t in ("sound_cls", "t2i_zh")}
    recipe = sk.SkillNetRecipe(steps=3, batch_size=8)
    pretrain = (sk.SkillNetRecipe(steps=2, batch_size=8), pre)
    result = compare(data, recipe, tmp_path, pretrain, workers=2, progress=False)
    assert set(result["metrics"]) == {
        "skillnet", "skillnet-pretrained", "dense-multitask", "dense-multitask-pretrained",
        "dense-single", "chance",
    }  # fmt: skip
    tasks = {t: ms.models.create("skillnet-tiny").cfg.tasks[t] for t in data}
    serial = train_one("skillnet-tiny", tasks, data, recipe, pretrain, threads=1)
    assert result["metrics"]["skillnet-pretrained"] == serial
    with pytest.raises(ValueError, match="workers=0"):
        compare(data, recipe, tmp_path, workers=0)
