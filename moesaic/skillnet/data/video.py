"""Video: moving-digit clips generated here, labelled by digit and direction (DATA.md 4a).

A digit sprite (``glyphs.DigitRenderer``, fonts disjoint between splits) moves in a straight
line across a black canvas in one of 8 directions at 1-2 pixels per frame, starting where it
stays inside the canvas for the whole clip. Captions name both: ``text`` "digit three moves
up-left", ``text_zh`` "数字三向左上移动"; ``label`` is digit * 8 + direction, so the direction
can be read only from the motion, never from a single frame.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moesaic.skillnet.data.common import SPLITS, Splits, cached, encode_bytes
from moesaic.skillnet.data.glyphs import DigitRenderer, number_en, number_zh

__all__ = ["DIRECTIONS", "load_moving_digits"]

# (name, zh name, dx, dy) with y growing downwards
DIRECTIONS = (
    ("right", "右", 1, 0), ("left", "左", -1, 0), ("down", "下", 0, 1), ("up", "上", 0, -1),
    ("down-right", "右下", 1, 1), ("down-left", "左下", -1, 1),
    ("up-right", "右上", 1, -1), ("up-left", "左上", -1, -1),
)  # fmt: skip


def load_moving_digits(
    n_train: int = 1600,
    n_eval: int = 320,
    frames: int = 8,
    canvas: int = 32,
    sprite: int = 12,
    max_len: int = 32,
    seed: int = 0,
    data_dir: str | Path | None = None,
) -> Splits:
    """``item`` uint8 (N, frames, canvas, canvas), ``text`` / ``text_zh`` uint8 (N, max_len),
    ``label`` int64 (N,) in [0, 80)."""
    if canvas - sprite < 2 * (frames - 1):
        raise ValueError(
            f"canvas={canvas} - sprite={sprite} must be >= 2 * (frames - 1) = {2 * (frames - 1)} "
            "so that the sprite stays inside the canvas"
        )
    params = dict(
        n_train=n_train, n_eval=n_eval, frames=frames, canvas=canvas, sprite=sprite,
        max_len=max_len, seed=seed,
    )  # fmt: skip

    def build() -> Splits:
        sizes = {"train": n_train, "val": n_eval, "test": n_eval}
        return {s: _make(s, sizes[s], frames, canvas, sprite, max_len, seed) for s in SPLITS}

    return cached("moving-digits", params, build, data_dir)


def _start(rng: np.random.Generator, d: int, travel: int, room: int) -> int:
    """A start coordinate in [0, room] that keeps ``start + d * travel`` in [0, room]."""
    low, high = (travel, room) if d < 0 else (0, room - travel) if d > 0 else (0, room)
    return int(rng.integers(low, high + 1))


def _make(split: str, n: int, T: int, canvas: int, sprite: int, max_len: int, seed: int):
    rng = np.random.default_rng([seed, 10 + SPLITS.index(split)])
    render = DigitRenderer(split, sprite)
    clips = np.zeros((n, T, canvas, canvas), dtype=np.uint8)
    digits, directions = rng.integers(0, 10, size=n), rng.integers(0, 8, size=n)
    room = canvas - sprite
    for i in range(n):
        _, _, dx, dy = DIRECTIONS[directions[i]]
        speed = int(rng.integers(1, 3))
        image = render(int(digits[i]), rng)
        x0 = _start(rng, dx, speed * (T - 1), room)
        y0 = _start(rng, dy, speed * (T - 1), room)
        for t in range(T):
            x, y = x0 + dx * speed * t, y0 + dy * speed * t
            clips[i, t, y : y + sprite, x : x + sprite] = image
    en = [f"digit {number_en(int(d))} moves {DIRECTIONS[k][0]}" for d, k in zip(digits, directions)]
    zh = [f"数字{number_zh(int(d))}向{DIRECTIONS[k][1]}移动" for d, k in zip(digits, directions)]
    return {
        "item": clips,
        "text": encode_bytes(en, max_len),
        "text_zh": encode_bytes(zh, max_len),
        "label": (digits * 8 + directions).astype(np.int64),
    }
