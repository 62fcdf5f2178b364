"""Digit sprites rendered with Debian's DejaVu fonts (fonts-dejavu-core), with augmentation.

Used by the number-image pairs and the moving-digit videos. Fonts are split between train, val
and test (``FONT_SPLITS``), so evaluation images come from typefaces training never saw.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moesaic.skillnet.data.common import require_file, require_module

__all__ = ["FONT_DIR", "FONT_SPLITS", "DigitRenderer", "number_en", "number_zh"]

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
FONT_SPLITS = {
    "train": ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf"),
    "val": ("DejaVuSerif-Bold.ttf",),
    "test": ("DejaVuSansMono-Bold.ttf",),
}

_EN_ONES = "zero one two three four five six seven eight nine".split()
_EN_TEENS = (
    "ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split()
)
_EN_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_ZH_DIGITS = "零一二三四五六七八九"


def number_en(n: int) -> str:
    """English words for 0 <= n < 100: 37 -> "thirty-seven"."""
    if not 0 <= n < 100:
        raise ValueError(f"n={n} must lie in [0, 100)")
    if n < 10:
        return _EN_ONES[n]
    if n < 20:
        return _EN_TEENS[n - 10]
    tens, ones = divmod(n, 10)
    return _EN_TENS[tens] + ("" if ones == 0 else "-" + _EN_ONES[ones])


def number_zh(n: int) -> str:
    """Chinese numeral for 0 <= n < 100: 37 -> "三十七", 15 -> "十五", 40 -> "四十"."""
    if not 0 <= n < 100:
        raise ValueError(f"n={n} must lie in [0, 100)")
    if n < 10:
        return _ZH_DIGITS[n]
    tens, ones = divmod(n, 10)
    return ("" if tens == 1 else _ZH_DIGITS[tens]) + "十" + ("" if ones == 0 else _ZH_DIGITS[ones])


class DigitRenderer:
    """Renders digit sprites of ``size`` x ``size`` pixels (uint8, white on black) in the fonts
    of one split, each with a random font, scale, rotation and offset drawn from ``rng``."""

    def __init__(self, split: str, size: int) -> None:
        if split not in FONT_SPLITS:
            raise ValueError(f"split={split!r} is not one of {sorted(FONT_SPLITS)}")
        self.image = require_module("digit-glyphs", "PIL.Image", "pillow")
        draw = require_module("digit-glyphs", "PIL.ImageDraw", "pillow")
        font = require_module("digit-glyphs", "PIL.ImageFont", "pillow")
        self.size = size
        self.glyphs = []  # [font][digit] -> cropped PIL image
        for name in FONT_SPLITS[split]:
            path = require_file("digit-glyphs", FONT_DIR / name, "fonts-dejavu-core")
            f = font.truetype(str(path), 48)
            row = []
            for d in range(10):
                canvas = self.image.new("L", (64, 64), 0)
                draw.Draw(canvas).text((8, 0), str(d), fill=255, font=f)
                row.append(canvas.crop(canvas.getbbox()))
            self.glyphs.append(row)

    def __call__(self, digit: int, rng: np.random.Generator) -> np.ndarray:
        """One sprite of ``digit``: uint8 (size, size)."""
        glyph = self.glyphs[rng.integers(len(self.glyphs))][digit]
        glyph = glyph.rotate(float(rng.uniform(-12, 12)), resample=2, expand=True)
        scale = rng.uniform(0.7, 1.0) * self.size / max(glyph.size)
        w, h = max(1, round(glyph.width * scale)), max(1, round(glyph.height * scale))
        glyph = glyph.resize((w, h), resample=2)
        out = self.image.new("L", (self.size, self.size), 0)
        out.paste(
            glyph, (int(rng.integers(self.size - w + 1)), int(rng.integers(self.size - h + 1)))
        )
        return np.asarray(out, dtype=np.uint8)
