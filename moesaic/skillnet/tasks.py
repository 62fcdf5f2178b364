"""SkillNet's tasks and their data: which loader feeds which task, at which size.

Tasks (``DEFAULT_TASKS`` in moesaic/skillnet/model.py): ``text_cls`` (WordNet supersense),
``sound_cls`` (spoken words), ``t2i_en`` / ``t2i_zh`` (number captions -> images), ``t2v``
(motion captions -> moving-digit clips), ``t2c`` (docstring -> stdlib function).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from moesaic.skillnet import data as sd

__all__ = ["TaskData", "PRESETS", "PRESET_STEPS", "load_task_data"]

# preset -> loader keyword arguments per data source; "smoke" builds in seconds
PRESETS: dict[str, dict[str, dict]] = {
    "smoke": {
        "supersense": {"num_classes": 10, "per_class": 150},
        "spoken": {"repeats": 1},
        "numbers": {"n_train": 900, "n_eval": 180},
        "video": {"n_train": 800, "n_eval": 160},
        "code": {"n_train": 800, "n_eval": 150},
    },
    "default": {
        "supersense": {"num_classes": 10, "per_class": 600},
        "spoken": {"repeats": 3},
        "numbers": {"n_train": 3600, "n_eval": 360},
        "video": {"n_train": 3200, "n_eval": 320},
        "code": {"n_train": 3000, "n_eval": 300},
    },
}


# preset -> (pretraining steps, fine-tuning steps) of the CLI's recipe at that preset
PRESET_STEPS: dict[str, tuple[int, int]] = {"smoke": (300, 300), "default": (1500, 1500)}


@dataclasses.dataclass(frozen=True)
class TaskData:
    """One task's splits as tensors: ``inputs`` / ``labels`` for classification, ``query`` /
    ``item`` / ``labels`` for retrieval (items with equal labels answer the same query)."""

    kind: str
    splits: dict[str, dict[str, torch.Tensor]]

    def size(self, split: str) -> int:
        return int(self.splits[split]["labels"].shape[0])


def _cls(splits: sd.Splits) -> TaskData:
    return TaskData(
        "classify",
        {s: {"inputs": torch.from_numpy(f["x"]), "labels": torch.from_numpy(f["y"])}
         for s, f in splits.items()},
    )  # fmt: skip


def _pairs(splits: sd.Splits, text_field: str = "text") -> TaskData:
    return TaskData(
        "retrieve",
        {
            s: {
                "query": torch.from_numpy(f[text_field]),
                "item": torch.from_numpy(f["item"]),
                "labels": torch.from_numpy(f["label"]),
            }
            for s, f in splits.items()
        },
    )


def load_task_data(
    tasks: tuple[str, ...] | None = None,
    preset: str = "smoke",
    seed: int = 0,
    data_dir: str | Path | None = None,
) -> dict[str, TaskData]:
    """The data of ``tasks`` (default all six) at ``preset`` size, built or read from the cache."""
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r} is not one of {sorted(PRESETS)}")
    sizes, kw = PRESETS[preset], {"seed": seed, "data_dir": data_dir}
    sources = {
        "text_cls": lambda: _cls(sd.load_supersense(**sizes["supersense"], **kw)),
        "sound_cls": lambda: _cls(sd.load_spoken_words(**sizes["spoken"], **kw)),
        "t2i_en": lambda: _pairs(sd.load_number_pairs(**sizes["numbers"], **kw)),
        "t2i_zh": lambda: _pairs(sd.load_number_pairs(**sizes["numbers"], **kw), "text_zh"),
        "t2v": lambda: _pairs(sd.load_moving_digits(**sizes["video"], **kw)),
        "t2c": lambda: _pairs(sd.load_doc_code(**sizes["code"], **kw)),
    }
    tasks = tuple(sources) if tasks is None else tuple(tasks)
    for t in tasks:
        if t not in sources:
            raise ValueError(f"task {t!r} is not one of {sorted(sources)}")
    return {t: sources[t]() for t in tasks}


def distinct_label_batch(labels: torch.Tensor, size: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of up to ``size`` examples with pairwise different labels (so in-batch
    negatives are true negatives), drawn at random."""
    order = rng.permutation(labels.shape[0])
    _, first = np.unique(labels.numpy()[order], return_index=True)
    picked = order[np.sort(first)]
    return rng.permutation(picked)[:size]
