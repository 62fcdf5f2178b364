"""``data.holdout_domain``: one domain leaves training and validation entirely and becomes its
own out-of-domain stream, with the domain ids of the whole corpus."""

from __future__ import annotations

import pytest

from moesaic.data import load_corpus, split_documents
from moesaic.train.config import ConfigError, DataConfig
from moesaic.train.data import prepare_data


def test_the_held_out_domain_is_never_trained_or_validated_on():
    held = "email"
    with_it = prepare_data(DataConfig(corpus="stdlib"))
    without = prepare_data(DataConfig(corpus="stdlib", holdout_domain=held))
    assert with_it.heldout is None and without.train.domains == with_it.train.domains
    held_id = with_it.train.domains.index(held)
    assert held_id in set(with_it.train.domain_ids.tolist())
    for stream in (without.train, without.val):
        assert held_id not in set(stream.domain_ids.tolist())
    assert set(without.heldout.domain_ids.tolist()) == {held_id}
    # the held-out stream is every document of the domain (bytes, "\n\n" between two), the
    # training stream the same split's other documents
    docs = load_corpus("stdlib")

    def stream_bytes(ds):
        return sum(len(d.text.encode()) for d in ds) + 2 * (len(ds) - 1)

    assert len(without.heldout.tokens) == stream_bytes([d for d in docs if d.domain == held])
    train_docs, _ = split_documents(docs, 0.05, 0)
    assert len(without.train.tokens) == stream_bytes([d for d in train_docs if d.domain != held])
    first = next(d for d in docs if d.domain == held).text.encode()
    assert bytes(without.heldout.tokens[: len(first)].tolist()) == first


def test_a_domain_the_corpus_lacks_fails_naming_its_domains():
    with pytest.raises(ConfigError, match=r"data.holdout_domain='nope' is not a domain of "
                       r"data.corpus='stdlib': \[.*'asyncio'"):  # fmt: skip
        prepare_data(DataConfig(corpus="stdlib", holdout_domain="nope"))
