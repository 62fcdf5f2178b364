"""SkillNet's image task: Fashion-MNIST (the reader is ``moesaic.data.images``).

``train`` is drawn from the 60k training file, ``val`` and ``test`` from disjoint halves of the
10k test file, so no image is in two splits. Class names come in English and Chinese.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moesaic.data.images import (
    FASHION_CLASSES_EN,
    FASHION_CLASSES_ZH,
    FASHION_ROOT,
    read_fashion_mnist,
    read_idx,
)
from moesaic.skillnet.data.common import Splits, cached

__all__ = ["FASHION_CLASSES_EN", "FASHION_CLASSES_ZH", "read_idx", "load_fashion_mnist"]


def _read(prefix: str) -> tuple[np.ndarray, np.ndarray]:
    # FASHION_ROOT is read here, at call time, so a test can point it elsewhere
    return read_fashion_mnist(prefix, FASHION_ROOT)


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
