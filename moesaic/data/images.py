"""Images: Fashion-MNIST from Debian's dataset-fashion-mnist (28x28 grey, 10 classes).

Nothing is downloaded: the IDX files come from the Debian package, and a missing package raises
``SourceMissingError`` naming the ``apt-get`` line. ``read_fashion_mnist`` returns one file pair
as numpy arrays; ``fashion_mnist`` draws seeded subsets of the training and test files.
"""

from __future__ import annotations

import functools
import gzip
from pathlib import Path

import numpy as np

from moesaic.data.debian import require_file

__all__ = [
    "FASHION_ROOT",
    "FASHION_CLASSES_EN",
    "FASHION_CLASSES_ZH",
    "read_idx",
    "read_fashion_mnist",
    "fashion_mnist",
]

FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES_EN = (
    "T-shirt/top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)  # fmt: skip
FASHION_CLASSES_ZH = (
    "T恤/上衣", "裤子", "套头衫", "连衣裙", "外套",
    "凉鞋", "衬衫", "运动鞋", "包", "短靴",
)  # fmt: skip
_FILES = {"train": "train", "test": "t10k"}


def read_idx(path: Path, offset: int) -> np.ndarray:
    """The uint8 payload of a gzipped IDX file (offset 16 for images, 8 for labels)."""
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)


@functools.lru_cache(maxsize=4)
def read_fashion_mnist(prefix: str, root: Path = FASHION_ROOT) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 (N, 28, 28) and labels int64 (N,) of ``prefix`` ("train": 60k, "t10k": 10k)."""
    images = require_file("fashion-mnist", Path(root) / f"{prefix}-images-idx3-ubyte.gz",
                          "dataset-fashion-mnist")  # fmt: skip
    labels = require_file("fashion-mnist", Path(root) / f"{prefix}-labels-idx1-ubyte.gz",
                          "dataset-fashion-mnist")  # fmt: skip
    return read_idx(images, 16).reshape(-1, 28, 28), read_idx(labels, 8).astype(np.int64)


def fashion_mnist(
    split: str, n: int | None = None, seed: int = 0, root: Path = FASHION_ROOT
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images and labels drawn at random under ``seed`` from ``split`` ("train" or "test";
    all of it, in file order, when ``n`` is None)."""
    if split not in _FILES:
        raise ValueError(f"split={split!r} must be one of {sorted(_FILES)}")
    x, y = read_fashion_mnist(_FILES[split], Path(root))
    if n is None:
        return x, y
    if not 1 <= n <= len(x):
        raise ValueError(f"n={n} must be in [1, {len(x)}] for the {split} split")
    pick = np.random.default_rng(seed).permutation(len(x))[:n]
    return x[pick], y[pick]
