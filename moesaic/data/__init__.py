"""Offline data for the language-model stack: corpora, tokenizers, splits, token streams.

import moesaic.data as md
docs = md.load_corpus("stdlib")
train_docs, val_docs = md.split_documents(docs, val_fraction=0.05, seed=0)
tok = md.ByteTokenizer()
train = md.TokenStream.from_documents(train_docs, tok)
val = md.TokenStream.from_documents(val_docs, tok, domains=train.domains)
sampler = md.BatchSampler(train, batch_size=8, seq_len=256, seed=0)
"""

from moesaic.data.corpora import (
    CORPORA,
    DEFAULT_CORPUS,
    CorpusNotInstalledError,
    Document,
    load_corpus,
    load_mixture,
)
from moesaic.data.splits import split_documents
from moesaic.data.stream import Batch, BatchSampler, TokenStream, eval_batches
from moesaic.data.tokenizer import (
    BPETokenizer,
    ByteTokenizer,
    Tokenizer,
    build_tokenizer,
    tokenizer_from_json,
)

__all__ = [
    "CORPORA",
    "DEFAULT_CORPUS",
    "Batch",
    "BatchSampler",
    "BPETokenizer",
    "ByteTokenizer",
    "CorpusNotInstalledError",
    "Document",
    "TokenStream",
    "Tokenizer",
    "build_tokenizer",
    "eval_batches",
    "load_corpus",
    "load_mixture",
    "split_documents",
    "tokenizer_from_json",
]
