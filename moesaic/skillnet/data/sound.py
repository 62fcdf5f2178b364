"""Sound: spoken words synthesized with espeak-ng in English and Mandarin, as log-mel frames.

Vocabulary (``WORDS``): the digits 0-9, each said in English or in Mandarin (one label per digit
whatever the language), and ten English command words, 20 classes. Each clip draws an accent
(English) or Mandarin, a voice variant, a speed, a pitch, a time shift and white noise at
10-30 dB SNR. Voice variants are split between train, val and test, so evaluation speakers are
never heard in training (DATA.md 3a). The clip (22,050 Hz, cut or padded to 1.5 s) becomes
``frames`` x ``n_mels`` log-mel features.
"""

from __future__ import annotations

import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from moesaic.skillnet.data.common import SPLITS, SourceMissingError, Splits, cached
from moesaic.skillnet.data.glyphs import number_en

__all__ = ["WORDS", "VARIANTS", "SAMPLE_RATE", "load_spoken_words", "synthesize", "log_mel"]

ESPEAK = "espeak-ng"
SAMPLE_RATE = 22050
COMMANDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
# label -> the words that say it: (English, Mandarin) for digits, English only for commands
WORDS = tuple((number_en(d), "零一二三四五六七八九"[d]) for d in range(10)) + tuple(
    (w,) for w in COMMANDS
)
VARIANTS = (
    "m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5",
    "croak", "klatt", "klatt2", "klatt3", "Andy", "Annie", "Alicia", "grandma",
)  # fmt: skip
ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-029", "en-us-nyc", "en-gb-x-rp")


def synthesize(text: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    """espeak-ng's waveform of ``text``: float32 (samples,) in [-1, 1] at 22,050 Hz."""
    if shutil.which(ESPEAK) is None:
        raise SourceMissingError(
            "spoken-words", "the espeak-ng program", "apt-get install -y espeak-ng"
        )
    cmd = [ESPEAK, "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", text]
    wav = subprocess.run(cmd, capture_output=True, check=True).stdout
    # --stdout cannot fix the header's length fields (DATA.md gotcha 1): read to EOF after it.
    return np.frombuffer(wav[44 : len(wav) - len(wav) % 2], dtype="<i2").astype(np.float32) / 32768


def _mel_filters(n_fft: int, n_mels: int, sr: int) -> np.ndarray:
    """Triangular HTK-mel filterbank: (n_fft // 2 + 1, n_mels)."""
    mel = lambda f: 2595 * np.log10(1 + f / 700)  # noqa: E731
    hz = lambda m: 700 * (10 ** (m / 2595) - 1)  # noqa: E731
    edges = hz(np.linspace(mel(40.0), mel(sr / 2 * 0.9), n_mels + 2))
    freqs = np.linspace(0, sr / 2, n_fft // 2 + 1)
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up, down = (freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid)
    return np.maximum(0, np.minimum(up, down)).T


def log_mel(wave: np.ndarray, frames: int = 64, n_mels: int = 32, n_fft: int = 1024) -> np.ndarray:
    """log(mel power + 1e-6) of ``frames`` Hann-windowed frames, hop n_fft/2: (frames, n_mels)."""
    hop = n_fft // 2
    need = (frames - 1) * hop + n_fft
    wave = np.pad(wave, (0, max(0, need - len(wave))))[:need]
    idx = np.arange(frames)[:, None] * hop + np.arange(n_fft)[None, :]
    spec = np.abs(np.fft.rfft(wave[idx] * np.hanning(n_fft), axis=1)) ** 2
    return np.log(spec @ _mel_filters(n_fft, n_mels, SAMPLE_RATE) + 1e-6).astype(np.float32)


def load_spoken_words(
    repeats: int = 2,
    frames: int = 64,
    n_mels: int = 32,
    seed: int = 0,
    data_dir: str | Path | None = None,
) -> Splits:
    """``x`` float16 (N, frames, n_mels) log-mel, ``y`` int64 (N,) in [0, 20), ``speaker``
    int64 (N,) the index of the voice variant in ``VARIANTS``.

    Every (word, voice variant) pair is synthesized ``repeats`` times with fresh accent, speed,
    pitch, shift and noise; 14 variants train, 3 validate, 3 test.
    """
    params = dict(repeats=repeats, frames=frames, n_mels=n_mels, seed=seed, espeak="1.51")

    def build() -> Splits:
        order = np.random.default_rng(seed).permutation(len(VARIANTS))
        groups = {"train": order[:14], "val": order[14:17], "test": order[17:]}
        return {
            s: _make(s, [VARIANTS[i] for i in groups[s]], repeats, frames, n_mels, seed)
            for s in SPLITS
        }

    return cached("spoken-words", params, build, data_dir)


def _make(split, variants, repeats, frames, n_mels, seed) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([seed, 20 + SPLITS.index(split)])
    jobs = []  # (label, text, voice, speed, pitch)
    for label, words in enumerate(WORDS):
        for variant in variants:
            for _ in range(repeats):
                k = int(rng.integers(len(words)))
                lang = "cmn" if k == 1 else ACCENTS[rng.integers(len(ACCENTS))]
                jobs.append(
                    (label, words[k], f"{lang}+{variant}", *rng.integers([120, 30], [200, 70]))
                )
    with ThreadPoolExecutor(2) as pool:
        waves = list(pool.map(lambda j: synthesize(j[1], j[2], int(j[3]), int(j[4])), jobs))
    need = (frames + 1) * 512
    x = np.zeros((len(jobs), frames, n_mels), dtype=np.float16)
    for i, wave in enumerate(waves):
        wave = wave[:need]
        shift = int(rng.integers(0, need - len(wave) + 1))
        wave = np.pad(wave, (shift, need - len(wave) - shift))
        snr_db = rng.uniform(10, 30)
        noise = rng.standard_normal(need) * np.sqrt(np.mean(wave**2) / 10 ** (snr_db / 10))
        x[i] = log_mel(wave + noise, frames, n_mels)
    return {
        "x": x,
        "y": np.array([j[0] for j in jobs], dtype=np.int64),
        "speaker": np.array([VARIANTS.index(j[2].split("+")[1]) for j in jobs], dtype=np.int64),
    }
