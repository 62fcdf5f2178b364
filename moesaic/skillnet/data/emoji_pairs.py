"""Paired text-image data in English and Chinese: emoji images and their names (DATA.md 6a).

Images are rendered with Debian's Noto Color Emoji (a CBDT bitmap font: size 109 only, colour
glyphs via ``embedded_color``), converted to grey and shrunk to ``image_size``; names in English
and Chinese come from the ``emoji`` package (``text`` "red apple", ``text_zh`` "红苹果").
Skin-tone variants, and sequences that do not render as one glyph, are dropped. Emoji are split
between train, val and test, so every test image and name is unseen. ``label`` = row index.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moesaic.skillnet.data.common import (
    SPLITS,
    Splits,
    cached,
    encode_bytes,
    require_file,
    require_module,
    split_by_key,
)

__all__ = ["load_emoji_pairs"]

EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")


def _name(raw: str) -> str:
    return raw.strip(":").replace("_", " ")


def load_emoji_pairs(
    image_size: int = 32,
    max_len: int = 48,
    limit: int | None = None,
    seed: int = 0,
    data_dir: str | Path | None = None,
) -> Splits:
    """``item`` uint8 (N, image_size, image_size) grey images, ``text`` / ``text_zh`` uint8
    (N, max_len) names, ``label`` int64 (N,); ``limit`` keeps the first emoji in code-point
    order (None: all, about 1,850)."""
    emoji = require_module("emoji-pairs", "emoji", "emoji")
    params = dict(
        image_size=image_size, max_len=max_len, limit=limit, seed=seed, emoji=emoji.__version__
    )

    def build() -> Splits:
        emoji.config.load_language("zh")
        chars = sorted(
            c
            for c, d in emoji.EMOJI_DATA.items()
            if "zh" in d and "skin_tone" not in d["en"] and d.get("status", 2) == 2
        )
        images, kept = _render(chars, image_size, limit)
        en = [_name(emoji.EMOJI_DATA[c]["en"]) for c in kept]
        zh = [_name(emoji.EMOJI_DATA[c]["zh"]) for c in kept]
        split = split_by_key(kept, (0.1, 0.1), seed)
        out = {}
        for s, name in enumerate(SPLITS):
            rows = np.flatnonzero(split == s)
            out[name] = {
                "item": images[rows],
                "text": encode_bytes([en[i] for i in rows], max_len),
                "text_zh": encode_bytes([zh[i] for i in rows], max_len),
                "label": np.arange(len(rows), dtype=np.int64),
            }
        return out

    return cached("emoji-pairs", params, build, data_dir)


def _render(chars: list[str], size: int, limit: int | None) -> tuple[np.ndarray, list[str]]:
    """Grey images of the emoji that render as one non-blank glyph, and those emoji."""
    font_path = require_file("emoji-pairs", EMOJI_FONT, "fonts-noto-color-emoji")
    image = require_module("emoji-pairs", "PIL.Image", "pillow")
    draw = require_module("emoji-pairs", "PIL.ImageDraw", "pillow")
    font = require_module("emoji-pairs", "PIL.ImageFont", "pillow").truetype(str(font_path), 109)
    images, kept = [], []
    for c in chars:
        if limit is not None and len(kept) >= limit:
            break
        left, _, right, _ = font.getbbox(c)
        if right - left > 140:  # a multi-glyph fallback
            continue
        canvas = image.new("RGB", (136, 128), "white")
        draw.Draw(canvas).text((0, 0), c, font=font, embedded_color=True)
        grey = np.asarray(canvas.convert("L").resize((size, size), resample=2), dtype=np.uint8)
        if grey.min() < 250:  # not blank
            images.append(grey)
            kept.append(c)
    return np.stack(images), kept
