"""Paired text-image data for retrieval in English and Chinese: two-digit number images.

An image shows a number 10..99 as two digit sprites side by side (``glyphs.DigitRenderer``,
fonts disjoint between splits); its captions are the number in words, ``text`` in English
("thirty-seven") and ``text_zh`` in Chinese ("三十七"). Digit order matters: a bag of characters
cannot tell 三十七 from 七十三 (DATA.md 6b). ``label`` is n - 10.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moesaic.skillnet.data.common import SPLITS, Splits, cached, encode_bytes
from moesaic.skillnet.data.glyphs import DigitRenderer, number_en, number_zh

__all__ = ["load_number_pairs"]


def load_number_pairs(
    n_train: int = 1800,
    n_eval: int = 360,
    image_size: int = 32,
    max_len: int = 24,
    seed: int = 0,
    data_dir: str | Path | None = None,
) -> Splits:
    """``item`` uint8 (N, image_size, image_size), ``text`` / ``text_zh`` uint8 (N, max_len),
    ``label`` int64 (N,) in [0, 90)."""
    if image_size % 2 or image_size < 8:
        raise ValueError(f"image_size={image_size} must be an even int >= 8")
    params = dict(n_train=n_train, n_eval=n_eval, image_size=image_size, max_len=max_len, seed=seed)

    def build() -> Splits:
        return {
            split: _make(split, n_train if split == "train" else n_eval, image_size, max_len, seed)
            for split in SPLITS
        }

    return cached("number-pairs", params, build, data_dir)


def _make(split: str, n: int, size: int, max_len: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    half = size // 2
    render = DigitRenderer(split, half)
    numbers = rng.integers(10, 100, size=n)
    images = np.zeros((n, size, size), dtype=np.uint8)
    for i, number in enumerate(numbers):
        top = int(rng.integers(0, size - half + 1))
        images[i, top : top + half, :half] = render(int(number) // 10, rng)
        images[i, top : top + half, half:] = render(int(number) % 10, rng)
    return {
        "item": images,
        "text": encode_bytes([number_en(int(k)) for k in numbers], max_len),
        "text_zh": encode_bytes([number_zh(int(k)) for k in numbers], max_len),
        "label": (numbers - 10).astype(np.int64),
    }
