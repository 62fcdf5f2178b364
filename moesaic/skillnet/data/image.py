"""Images: Fashion-MNIST from Debian's dataset-fashion-mnist (28x28 grey, 10 classes; DATA.md 2).

``train`` is drawn from the 60k training file, ``val`` and ``test`` from disjoint halves of the
10k test file, so no image is in two splits. Class names come in English and Chinese.
"""

from __future__ import annotations

import functools
import gzip
from pathlib import Path

import numpy as np

from moesaic.skillnet.data.common import Splits, cached, require_file

__all__ = ["FASHION_CLASSES_EN", "FASHION_CLASSES_ZH", "read_idx", "load_fashion_mnist"]

FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES_EN = (
    "T-shirt/top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)  # fmt: skip
FASHION_CLASSES_ZH = (
    "T恤/上衣",
    "裤子",
    "套头衫",
    "连衣裙",
    "外套",
    "凉鞋",
    "衬衫",
    "运动鞋",
    "包",
    "短靴",
)


def read_idx(path: Path, offset: int) -> np.ndarray:
    """The uint8 payload of a gzipped IDX file (offset 16 for images, 8 for labels)."""
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)


def _read(prefix: str) -> tuple[np.ndarray, np.ndarray]:
    return _read_cached(FASHION_ROOT, prefix)


@functools.lru_cache(maxsize=2)
def _read_cached(root: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    images = require_file("fashion-mnist", root / f"{prefix}-images-idx3-ubyte.gz",
                          "dataset-fashion-mnist")  # fmt: skip
    labels = require_file("fashion-mnist", root / f"{prefix}-labels-idx1-ubyte.gz",
                          "dataset-fashion-mnist")  # fmt: skip
    return read_idx(images, 16).reshape(-1, 28, 28), read_idx(labels, 8).astype(np.int64)


def load_fashion_mnist(
    n_train: int = 6000, n_eval: int = 1000, seed: int = 0, data_dir: str | Path | None = None
) -> Splits:
    """``x`` uint8 (N, 28, 28), ``y`` int64 (N,): ``n_train`` training and ``n_eval`` val and
    test images, drawn at random under ``seed``."""
    if not 1 <= n_train <= 60000 or not 1 <= n_eval <= 5000:
        raise ValueError(f"n_train={n_train} must be in [1, 60000], n_eval={n_eval} in [1, 5000]")
    params = dict(n_train=n_train, n_eval=n_eval, seed=seed)

    def build() -> Splits:
        rng = np.random.default_rng(seed)
        x_tr, y_tr = _read("train")
        x_te, y_te = _read("t10k")
        pick = rng.permutation(len(x_tr))[:n_train]
        held = rng.permutation(len(x_te))
        val, test = held[:n_eval], held[5000 : 5000 + n_eval]
        return {
            "train": {"x": x_tr[pick], "y": y_tr[pick]},
            "val": {"x": x_te[val], "y": y_te[val]},
            "test": {"x": x_te[test], "y": y_te[test]},
        }

    return cached("fashion-mnist", params, build, data_dir)
