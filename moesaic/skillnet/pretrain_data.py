"""The data of SkillNet's sparse self-supervised pretraining: unlabelled inputs per modality and
image-text pairs in English and Chinese, none of it from a task's val or test split.

=========  =====================================================================================
modality   unlabelled inputs (masked prediction)
=========  =====================================================================================
text       WordNet glosses on the train side of supersense's split (its hash split by gloss, so
           no val / test gloss of ``text_cls``), and the train captions of the retrieval tasks
code       the train functions of ``t2c`` (stdlib files disjoint from its val / test files)
image      Fashion-MNIST train images (padded to the model's image size), the train emoji and
           the train number images of ``t2i``
video      the train clips of ``t2v``
sound      the train clips of ``sound_cls``
=========  =====================================================================================

Image-text pairs (contrastive, the caption side with the text skill, the image side with the
image skill): emoji and their names (train emoji only) and Fashion-MNIST images captioned by
class ("a photo of a coat" / "一张外套的照片"). Neither is a downstream task's data, so what
pretraining teaches a retrieval task is the skill, not the answers.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from moesaic.skillnet import data as sd
from moesaic.skillnet.data.common import encode_bytes, split_by_key
from moesaic.skillnet.data.image import FASHION_CLASSES_EN, FASHION_CLASSES_ZH
from moesaic.skillnet.data.text import read_glosses
from moesaic.skillnet.tasks import TaskData

__all__ = ["PRETRAIN_PRESETS", "PretrainData", "load_pretrain_data"]

# preset -> how much extra unlabelled data (on top of the tasks' train inputs)
PRETRAIN_PRESETS: dict[str, dict[str, int]] = {
    "smoke": {"glosses": 8000, "fashion": 3000},
    "default": {"glosses": 40000, "fashion": 12000},
}
TEXT_LEN = 64  # bytes per gloss (``SkillNetConfig.text_len``)


@dataclasses.dataclass(frozen=True)
class PretrainData:
    """``inputs[modality]``: unlabelled inputs (N, ...) in the model's input format;
    ``pairs[lang]`` (``"en"``, ``"zh"``): ``query`` caption bytes, ``item`` images, ``labels``
    (pairs with equal labels share a caption)."""

    inputs: dict[str, torch.Tensor]
    pairs: dict[str, dict[str, torch.Tensor]]

    def sizes(self) -> dict[str, int]:
        out = {m: int(x.shape[0]) for m, x in self.inputs.items()}
        out.update({f"pairs_{k}": int(v["labels"].shape[0]) for k, v in self.pairs.items()})
        return out


def _pad_bytes(arrays: list[np.ndarray]) -> np.ndarray:
    """Byte rows of different widths, zero-padded to the widest."""
    width = max(a.shape[1] for a in arrays)
    return np.concatenate([np.pad(a, ((0, 0), (0, width - a.shape[1]))) for a in arrays])


def _pad_images(x: np.ndarray, size: int) -> np.ndarray:
    """Centre (N, h, w) images on a black (N, size, size) canvas."""
    top, left = (size - x.shape[1]) // 2, (size - x.shape[2]) // 2
    if top < 0 or left < 0:
        raise ValueError(f"images of {x.shape[1:]} do not fit the model's image_size={size}")
    return np.pad(x, ((0, 0), (top, size - x.shape[1] - top), (left, size - x.shape[2] - left)))


def load_pretrain_data(
    tasks: dict[str, TaskData],
    preset: str = "smoke",
    seed: int = 0,
    data_dir: str | Path | None = None,
    image_size: int = 32,
) -> PretrainData:
    """Pretraining data next to the task data ``tasks`` (from ``load_task_data`` with the same
    ``seed``): their train inputs without labels, plus the extra sources of the module table."""
    if preset not in PRETRAIN_PRESETS:
        raise ValueError(f"preset={preset!r} is not one of {sorted(PRETRAIN_PRESETS)}")
    sizes = PRETRAIN_PRESETS[preset]
    rng = np.random.default_rng([seed, 7])
    train = {t: {k: v.numpy() for k, v in d.splits["train"].items()} for t, d in tasks.items()}

    glosses = sorted({g for g, _ in read_glosses()})
    side = split_by_key(glosses, (0.1, 0.1), seed)  # supersense's split of the same texts
    glosses = [g for g, s in zip(glosses, side) if s == 0]
    picked = rng.permutation(len(glosses))[: sizes["glosses"]]
    text = [encode_bytes([glosses[i] for i in sorted(picked)], TEXT_LEN)]
    text += [np.unique(v["query"], axis=0) for t, v in train.items() if t.startswith("t2")]

    fashion = sd.load_fashion_mnist(n_train=sizes["fashion"], seed=seed, data_dir=data_dir)
    f_img = _pad_images(fashion["train"]["x"], image_size)
    emoji = sd.load_emoji_pairs(image_size=image_size, seed=seed, data_dir=data_dir)["train"]
    images = [f_img, emoji["item"]]
    images += [v["item"] for t, v in train.items() if t.startswith("t2i")][:1]  # en, zh: same

    inputs = {"text": _pad_bytes(text), "image": np.concatenate(images)}
    for modality, task, field in (
        ("code", "t2c", "item"),
        ("video", "t2v", "item"),
        ("sound", "sound_cls", "inputs"),
    ):
        if task in train:
            inputs[modality] = train[task][field]

    y = fashion["train"]["y"]
    n_emoji = emoji["label"].shape[0]
    pairs = {}
    for lang, field, names, template in (
        ("en", "text", FASHION_CLASSES_EN, "a photo of a {}"),
        ("zh", "text_zh", FASHION_CLASSES_ZH, "一张{}的照片"),
    ):
        captions = encode_bytes([template.format(names[c]) for c in y], emoji[field].shape[1])
        pairs[lang] = {
            "query": torch.from_numpy(np.concatenate([emoji[field], captions])),
            "item": torch.from_numpy(np.concatenate([emoji["item"], f_img])),
            "labels": torch.from_numpy(np.concatenate([emoji["label"], n_emoji + y])),
        }
    return PretrainData({m: torch.from_numpy(np.ascontiguousarray(x)) for m, x in inputs.items()},
                        pairs)  # fmt: skip
