"""Tokenizers for the language-model stack: raw UTF-8 bytes, or byte-level BPE (``bpe`` extra).

Both share one small contract (``Tokenizer``): ``encode`` gives a 1-D numpy array of ids,
``decode`` takes a list, numpy array or LongTensor, and ``to_json`` / ``from_json`` round-trip
the tokenizer so a checkpoint can carry it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

__all__ = ["Tokenizer", "ByteTokenizer", "BPETokenizer", "build_tokenizer", "tokenizer_from_json"]

TOKENIZER_NAMES = ("byte", "bpe")
_BPE_EXTRA_MESSAGE = "BPE tokenization needs the 'bpe' extra: pip install 'moesaic[bpe]'"

Ids = Sequence[int] | np.ndarray | torch.Tensor


@runtime_checkable
class Tokenizer(Protocol):
    name: str

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, ids: Ids) -> str: ...

    def to_json(self) -> str: ...


def _as_int_list(ids: Ids, vocab_size: int) -> list[int]:
    """``ids`` as a flat list of ints, each checked to lie in [0, vocab_size)."""
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy()
    arr = np.asarray(ids)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"ids must be 1-D ints; got dtype={arr.dtype}, ndim={arr.ndim}")
    if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
        raise ValueError(f"ids must lie in [0, {vocab_size}), got min={arr.min()} max={arr.max()}")
    return arr.astype(np.int64).tolist()


def _check_json_type(text: str, expected: str) -> dict[str, Any]:
    record = json.loads(text)
    if not isinstance(record, dict) or record.get("type") != expected:
        found = record.get("type") if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"tokenizer JSON type={found!r} must be {expected!r}")
    return record


class ByteTokenizer:
    """The UTF-8 bytes of the text, one id per byte (``vocab_size`` 256); any text round-trips.

    Examples::

        >>> tok = ByteTokenizer()
        >>> tok.decode(tok.encode("héllo"))
        'héllo'
    """

    name = "byte"

    @property
    def vocab_size(self) -> int:
        return 256

    def encode(self, text: str) -> np.ndarray:
        """The uint8 array of the UTF-8 bytes of ``text``."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()

    def decode(self, ids: Ids) -> str:
        """The text of the bytes ``ids``; invalid UTF-8 (a cut character) becomes U+FFFD."""
        return bytes(_as_int_list(ids, 256)).decode("utf-8", errors="replace")

    def to_json(self) -> str:
        return json.dumps({"type": self.name})

    @classmethod
    def from_json(cls, text: str) -> ByteTokenizer:
        _check_json_type(text, cls.name)
        return cls()

    def __repr__(self) -> str:
        return "ByteTokenizer()"


def _hf_tokenizers() -> Any:
    """The optional ``tokenizers`` package, imported where it is used."""
    try:
        import tokenizers
    except ImportError as e:
        raise ImportError(_BPE_EXTRA_MESSAGE) from e
    return tokenizers


class BPETokenizer:
    """Byte-level BPE from the ``tokenizers`` package (ByteLevel pre-tokenizer and decoder).

    Its alphabet holds all 256 bytes, so any text round-trips. Build one with
    ``BPETokenizer.train(texts, vocab_size)`` or ``BPETokenizer.from_json(text)``.
    """

    name = "bpe"

    def __init__(self, hf_tokenizer: Any) -> None:
        self._tok = hf_tokenizer

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BPETokenizer:
        """Learn merges on ``texts`` until ``vocab_size`` ids (256 bytes included) exist."""
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
            raise TypeError(f"vocab_size={vocab_size!r} must be an int")
        if vocab_size < 256:
            raise ValueError(f"vocab_size={vocab_size} must be >= 256 (the byte alphabet)")
        hf = _hf_tokenizers()
        tok = hf.Tokenizer(hf.models.BPE())
        tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = hf.decoders.ByteLevel()
        trainer = hf.trainers.BpeTrainer(
            vocab_size=vocab_size,
            initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> np.ndarray:
        """The int32 array of token ids of ``text``."""
        return np.asarray(self._tok.encode(text).ids, dtype=np.int32)

    def decode(self, ids: Ids) -> str:
        return self._tok.decode(_as_int_list(ids, self.vocab_size))

    def to_json(self) -> str:
        return json.dumps({"type": self.name, "tokenizer": json.loads(self._tok.to_str())})

    @classmethod
    def from_json(cls, text: str) -> BPETokenizer:
        record = _check_json_type(text, cls.name)
        hf = _hf_tokenizers()
        return cls(hf.Tokenizer.from_str(json.dumps(record["tokenizer"])))

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size})"


def build_tokenizer(
    name: str, texts: Iterable[str] | None = None, vocab_size: int | None = None
) -> Tokenizer:
    """A tokenizer by name: ``"byte"`` (no arguments) or ``"bpe"`` (trained on ``texts``)."""
    if name == "byte":
        if vocab_size not in (None, 256):
            raise ValueError(f"vocab_size={vocab_size} must be None or 256 for tokenizer 'byte'")
        return ByteTokenizer()
    if name == "bpe":
        if texts is None or vocab_size is None:
            raise ValueError("tokenizer 'bpe' needs texts and vocab_size to train on")
        return BPETokenizer.train(texts, vocab_size)
    raise ValueError(f"tokenizer name={name!r} is not one of {list(TOKENIZER_NAMES)}")


def tokenizer_from_json(text: str) -> Tokenizer:
    """The tokenizer that ``to_json`` wrote, whichever kind it is."""
    record = json.loads(text)
    kind = record.get("type") if isinstance(record, dict) else None
    classes = {ByteTokenizer.name: ByteTokenizer, BPETokenizer.name: BPETokenizer}
    if kind not in classes:
        raise ValueError(f"tokenizer JSON type={kind!r} is not one of {list(TOKENIZER_NAMES)}")
    return classes[kind].from_json(text)
