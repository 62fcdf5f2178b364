"""From a ``DataConfig`` to what the trainer consumes: tokenizer, sampler and fixed eval batches."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from moesaic.data import (
    BatchSampler,
    TokenStream,
    build_tokenizer,
    eval_batches,
    load_corpus,
    split_documents,
    tokenizer_from_json,
)
from moesaic.train.checkpoint import write_atomic
from moesaic.train.config import ConfigError, DataConfig

__all__ = ["PreparedData", "prepare_data", "split_corpus"]

TOKENIZER_FILE = "tokenizer.json"


@dataclasses.dataclass
class PreparedData:
    tokenizer: object
    train: TokenStream
    val: TokenStream
    # data.holdout_domain's documents (all of them), never trained on; None without one
    heldout: TokenStream | None = None

    def sampler(self, cfg: DataConfig, rank: int = 0, world_size: int = 1):
        """Batches of ``cfg.batch_size`` sequences; with several data-parallel ranks each gets
        its own rows of that global batch (so W ranks see exactly one process's batches)."""
        sampler = BatchSampler(self.train, cfg.batch_size, cfg.seq_len, seed=cfg.seed)
        return sampler if world_size == 1 else RankSlice(sampler, rank, world_size)

    def eval_batches(self, cfg: DataConfig) -> list:
        return eval_batches(self.val, cfg.batch_size, cfg.seq_len, cfg.eval_batches)

    def heldout_batches(self, cfg: DataConfig) -> list:
        """Fixed windows of the held-out domain (``data.eval_batches`` of them)."""
        if self.heldout is None:
            raise ValueError("data.holdout_domain is not set: this run holds no domain out")
        return eval_batches(self.heldout, cfg.batch_size, cfg.seq_len, cfg.eval_batches)


class RankSlice:
    """Rows ``rank * B/W .. (rank+1) * B/W`` of every global batch of ``sampler``."""

    def __init__(self, sampler: BatchSampler, rank: int, world_size: int) -> None:
        if sampler.batch_size % world_size:
            raise ValueError(
                f"data.batch_size={sampler.batch_size} must be divisible by the number of "
                f"processes {world_size} (it is the global batch)"
            )
        self.sampler, self.rank, self.world_size = sampler, rank, world_size

    def next_batch(self):
        batch = self.sampler.next_batch()
        per_rank = batch.x.shape[0] // self.world_size
        rows = slice(self.rank * per_rank, (self.rank + 1) * per_rank)
        return dataclasses.replace(
            batch, x=batch.x[rows], y=batch.y[rows], domain=batch.domain[rows]
        )

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


def split_corpus(cfg: DataConfig, docs: list | None = None):
    """``(train, validation, held_out, domains)`` documents of ``cfg``'s corpus: the seeded
    document split, with ``data.holdout_domain``'s documents taken out of both splits into
    ``held_out`` (empty without one). ``domains`` numbers every domain of the whole corpus, so
    the streams' domain ids agree whatever a split holds."""
    docs = load_corpus(cfg.corpus) if docs is None else docs
    domains = sorted({d.domain for d in docs})
    train_docs, val_docs = split_documents(docs, val_fraction=cfg.val_fraction, seed=cfg.seed)
    held = cfg.holdout_domain
    if held is None:
        return train_docs, val_docs, [], domains
    if held not in domains:
        raise ConfigError(
            f"data.holdout_domain={held!r} is not a domain of data.corpus={cfg.corpus!r}: {domains}"
        )
    held_out = [d for d in docs if d.domain == held]
    return (
        [d for d in train_docs if d.domain != held],
        [d for d in val_docs if d.domain != held],
        held_out,
        domains,
    )


def prepare_data(cfg: DataConfig, run_dir: Path | None = None) -> PreparedData:
    """Load and split the corpus, build (or reload from ``run_dir``) the tokenizer, tokenize."""
    train_docs, val_docs, held_docs, domains = split_corpus(cfg)
    saved = run_dir / TOKENIZER_FILE if run_dir is not None else None
    if saved is not None and saved.exists():
        tokenizer = tokenizer_from_json(saved.read_text())
    else:
        tokenizer = (
            build_tokenizer("byte")
            if cfg.tokenizer == "byte"
            else build_tokenizer("bpe", (d.text for d in train_docs), cfg.bpe_vocab_size)
        )
        if saved is not None:
            saved.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(saved, tokenizer.to_json())  # other ranks may be reading it
    train = TokenStream.from_documents(train_docs, tokenizer, domains=domains)
    val = TokenStream.from_documents(val_docs, tokenizer, domains=domains)
    held = TokenStream.from_documents(held_docs, tokenizer, domains=domains) if held_docs else None
    return PreparedData(tokenizer=tokenizer, train=train, val=val, heldout=held)
