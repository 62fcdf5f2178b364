"""Token streams and batches for language-model training.

Shapes: B batch, S sequence (the model's context); a window holds S + 1 tokens so that
``x = window[:-1]`` and ``y = window[1:]``.

``BatchSampler`` draws batch number i from ``numpy.random.default_rng([seed, i])``: its whole
state is the next batch number, so a resumed sampler yields exactly what an uninterrupted one
would. ``eval_batches`` takes fixed windows spread evenly over a stream, for a stable
validation loss.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from moesaic._validate import check_positive_int
from moesaic.data.corpora import Document
from moesaic.data.tokenizer import Tokenizer

__all__ = ["Batch", "BatchSampler", "TokenStream", "eval_batches"]

DOCUMENT_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class TokenStream:
    """Documents' tokens end to end, with the domain id of every token.

    ``tokens`` is uint8 when the vocabulary fits a byte, else int32; ``domain_ids[i]`` indexes
    ``domains`` for token i.
    """

    tokens: np.ndarray
    domain_ids: np.ndarray
    domains: list[str]
    vocab_size: int

    def __post_init__(self) -> None:
        if self.tokens.ndim != 1 or self.domain_ids.shape != self.tokens.shape:
            raise ValueError(
                f"tokens.shape={self.tokens.shape} and domain_ids.shape="
                f"{self.domain_ids.shape} must be equal and 1-D"
            )
        if len(self.domain_ids) and int(self.domain_ids.max()) >= len(self.domains):
            raise ValueError(
                f"domain_ids.max()={int(self.domain_ids.max())} must be < "
                f"len(domains)={len(self.domains)}"
            )

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def from_documents(
        cls,
        docs: Sequence[Document],
        tokenizer: Tokenizer,
        domains: Sequence[str] | None = None,
    ) -> TokenStream:
        """Tokenize ``docs`` in order, with ``"\\n\\n"`` between consecutive documents.

        Args:
            docs: the documents, at least one.
            tokenizer: any ``moesaic.data.Tokenizer``.
            domains: the domain names in id order; pass the training stream's ``domains``
                when building its validation stream so ids agree. Default: sorted names of
                the documents' domains.
        """
        if not docs:
            raise ValueError("docs must hold at least one document")
        domains = sorted({d.domain for d in docs}) if domains is None else list(domains)
        if len(domains) > 256:
            raise ValueError(f"len(domains)={len(domains)} must be <= 256 (uint8 domain ids)")
        domain_id = {name: i for i, name in enumerate(domains)}
        unknown = sorted({d.domain for d in docs} - domain_id.keys())
        if unknown:
            raise ValueError(f"document domains {unknown} are not in domains={domains}")
        dtype = np.uint8 if tokenizer.vocab_size <= 256 else np.int32
        pieces, ids = [], []
        for i, doc in enumerate(docs):
            text = doc.text if i == len(docs) - 1 else doc.text + DOCUMENT_SEPARATOR
            pieces.append(tokenizer.encode(text).astype(dtype, copy=False))
            ids.append(np.full(len(pieces[-1]), domain_id[doc.domain], dtype=np.uint8))
        return cls(np.concatenate(pieces), np.concatenate(ids), domains, tokenizer.vocab_size)


@dataclass(frozen=True)
class Batch:
    """Inputs ``x`` (B, S), next-token targets ``y`` (B, S), and each window's ``domain`` (B,)."""

    x: torch.Tensor
    y: torch.Tensor
    domain: torch.Tensor

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.x.to(device), self.y.to(device), self.domain.to(device))


def _check_sizes(stream: TokenStream, batch_size: int, seq_len: int) -> None:
    check_positive_int("batch_size", batch_size)
    check_positive_int("seq_len", seq_len)
    if len(stream) <= seq_len + 1:
        raise ValueError(
            f"stream of {len(stream)} tokens must be longer than seq_len + 1 = {seq_len + 1}"
        )


def _batch_at(stream: TokenStream, starts_B: np.ndarray, seq_len: int) -> Batch:
    """The windows of ``seq_len + 1`` tokens beginning at ``starts_B``."""
    idx_BS = starts_B[:, None] + np.arange(seq_len + 1)  # (B, S + 1)
    window_BS = torch.from_numpy(stream.tokens[idx_BS].astype(np.int64))
    domain_B = torch.from_numpy(stream.domain_ids[starts_B].astype(np.int64))
    # Contiguous, so that a model may call .view on x and a loss on y.view(-1).
    return Batch(window_BS[:, :-1].contiguous(), window_BS[:, 1:].contiguous(), domain_B)


class BatchSampler:
    """Random windows of a stream; batch i comes from ``default_rng([seed, i])``.

    Args:
        stream: the training tokens.
        batch_size: windows per batch (B).
        seq_len: tokens per input (S); each window holds S + 1.
        seed: a non-negative int.

    Examples::

        >>> sampler = BatchSampler(stream, batch_size=8, seq_len=128, seed=0)
        >>> batch = sampler.next_batch()  # batch.x, batch.y: (8, 128)
        >>> torch.save(sampler.state_dict(), "sampler.pt")
    """

    def __init__(self, stream: TokenStream, batch_size: int, seq_len: int, seed: int) -> None:
        _check_sizes(stream, batch_size, seq_len)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed={seed!r} must be an int >= 0")
        self.stream = stream
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.next_index = 0

    def next_batch(self) -> Batch:
        rng = np.random.default_rng([self.seed, self.next_index])
        starts_B = rng.integers(0, len(self.stream) - self.seq_len, size=self.batch_size)
        self.next_index += 1
        return _batch_at(self.stream, starts_B, self.seq_len)

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int]:
        """Plain ints: ``torch.load(weights_only=True)`` reads them back."""
        return {
            "next_batch": self.next_index,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "num_tokens": len(self.stream),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at ``state["next_batch"]``; every other field must match this sampler."""
        mine = self.state_dict()
        missing = sorted(mine.keys() - state.keys())
        if missing:
            raise ValueError(f"sampler state is missing fields {missing}")
        checked = [k for k in mine if k != "next_batch"]
        wrong = [f"{k}={state[k]!r} must equal {mine[k]}" for k in checked if state[k] != mine[k]]
        if wrong:
            raise ValueError("sampler state does not match this sampler: " + "; ".join(wrong))
        next_batch = state["next_batch"]
        if isinstance(next_batch, bool) or not isinstance(next_batch, int) or next_batch < 0:
            raise ValueError(f"next_batch={next_batch!r} must be an int >= 0")
        self.next_index = next_batch


def eval_batches(
    stream: TokenStream, batch_size: int, seq_len: int, num_batches: int
) -> list[Batch]:
    """``num_batches`` fixed batches whose windows are spread evenly over the whole stream.

    The ``batch_size * num_batches`` window starts run from the first token to the last full
    window in equal steps; batch b takes every ``num_batches``-th of them from b, so each batch
    (and any prefix of the list) spans the whole stream too. No randomness.
    """
    _check_sizes(stream, batch_size, seq_len)
    check_positive_int("num_batches", num_batches)
    count = batch_size * num_batches
    starts = np.linspace(0, len(stream) - seq_len - 1, count).round().astype(np.int64)
    per_batch = starts.reshape(batch_size, num_batches).T  # row b: batch b's window starts
    return [_batch_at(stream, starts_B, seq_len) for starts_B in per_batch]
