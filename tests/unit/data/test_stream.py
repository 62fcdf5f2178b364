import io
import itertools

import numpy as np
import pytest
import torch

import moesaic.data as md


def _counting_stream(n: int = 1000) -> md.TokenStream:
    """Token i is i, so a window's first input token is its start; domain = (i // 100) % 3."""
    domain_ids = (np.arange(n) // 100 % 3).astype(np.uint8)
    return md.TokenStream(np.arange(n, dtype=np.int32), domain_ids, ["a", "b", "c"], n)


def _assert_batches_equal(a: list[md.Batch], b: list[md.Batch]) -> None:
    assert len(a) == len(b)
    for p, q in zip(a, b):
        assert torch.equal(p.x, q.x) and torch.equal(p.y, q.y) and torch.equal(p.domain, q.domain)


def test_stream_joins_documents_with_a_blank_line_and_labels_every_token():
    docs = [md.Document("1", "ab", "prose"), md.Document("2", "c", "code")]
    stream = md.TokenStream.from_documents(docs, md.ByteTokenizer())
    assert stream.tokens.dtype == np.uint8
    assert bytes(stream.tokens) == b"ab\n\nc"  # no separator after the last document
    assert stream.domains == ["code", "prose"]
    assert stream.domain_ids.tolist() == [1, 1, 1, 1, 0]


def test_a_validation_stream_reuses_the_training_domain_ids():
    docs = [md.Document("1", "x", "prose")]
    stream = md.TokenStream.from_documents(docs, md.ByteTokenizer(), domains=["code", "prose"])
    assert stream.domain_ids.tolist() == [1]
    with pytest.raises(ValueError, match=r"domains \['prose'\] are not in domains=\['code'\]"):
        md.TokenStream.from_documents(docs, md.ByteTokenizer(), domains=["code"])


def test_a_bpe_stream_uses_int32():
    pytest.importorskip("tokenizers")
    tok = md.BPETokenizer.train(["hello world"] * 5, vocab_size=300)
    docs = [md.Document("1", "hello", "d")]
    assert md.TokenStream.from_documents(docs, tok).tokens.dtype == np.int32


def test_same_seed_gives_the_same_batches_and_another_seed_others():
    stream = _counting_stream()
    a, b = md.BatchSampler(stream, 4, 8, seed=5), md.BatchSampler(stream, 4, 8, seed=5)
    first = [a.next_batch() for _ in range(3)]
    _assert_batches_equal(first, [b.next_batch() for _ in range(3)])
    assert not torch.equal(first[0].x, first[1].x)
    assert not torch.equal(first[0].x, md.BatchSampler(stream, 4, 8, seed=6).next_batch().x)


def test_y_is_x_shifted_by_one_and_domain_is_that_of_the_first_token():
    stream = _counting_stream()
    batch = md.BatchSampler(stream, batch_size=16, seq_len=12, seed=0).next_batch()
    assert batch.x.shape == batch.y.shape == (16, 12) and batch.x.dtype == torch.long
    assert batch.x.is_contiguous() and batch.y.is_contiguous()
    assert torch.equal(batch.y, batch.x + 1)  # the counting stream: next token = token + 1
    assert batch.domain.tolist() == (batch.x[:, 0] // 100 % 3).tolist()


def test_resuming_from_a_saved_state_yields_the_uninterrupted_batches():
    stream = _counting_stream()
    uninterrupted = md.BatchSampler(stream, 4, 8, seed=7)
    expected = [uninterrupted.next_batch() for _ in range(6)]

    first = md.BatchSampler(stream, 4, 8, seed=7)
    head = list(itertools.islice(first, 3))  # __iter__ draws only what is taken
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = md.BatchSampler(stream, 4, 8, seed=7)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    tail = [resumed.next_batch() for _ in range(3)]
    _assert_batches_equal(head + tail, expected)


def test_load_state_dict_names_every_mismatched_field():
    stream = _counting_stream()
    state = md.BatchSampler(stream, 4, 8, seed=7).state_dict()
    other = md.BatchSampler(stream, 2, 16, seed=7)
    with pytest.raises(ValueError, match="batch_size=4 must equal 2; seq_len=8 must equal 16"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match=r"missing fields \['seed'\]"):
        other.load_state_dict({k: v for k, v in state.items() if k != "seed"})


def test_windows_stay_inside_a_stream_just_long_enough():
    stream = _counting_stream(10)  # seq_len 8 -> windows of 9 tokens start at 0 or 1
    sampler = md.BatchSampler(stream, batch_size=32, seq_len=8, seed=0)
    starts = {s for _ in range(4) for s in sampler.next_batch().x[:, 0].tolist()}
    assert starts == {0, 1}


def test_sizes_are_checked_with_the_numbers():
    stream = _counting_stream(10)
    with pytest.raises(
        ValueError, match=r"stream of 10 tokens must be longer than seq_len \+ 1 = 10"
    ):
        md.BatchSampler(stream, batch_size=1, seq_len=9, seed=0)
    with pytest.raises(ValueError, match="batch_size=0 must be >= 1"):
        md.BatchSampler(stream, batch_size=0, seq_len=4, seed=0)
    with pytest.raises(ValueError, match="seed=-1 must be an int >= 0"):
        md.BatchSampler(stream, batch_size=1, seq_len=4, seed=-1)
    with pytest.raises(ValueError, match="num_batches=0 must be >= 1"):
        md.eval_batches(stream, batch_size=1, seq_len=4, num_batches=0)


def test_eval_batches_are_fixed_and_spread_evenly_over_the_whole_stream():
    stream = _counting_stream(1000)
    batches = md.eval_batches(stream, batch_size=4, seq_len=9, num_batches=5)
    _assert_batches_equal(batches, md.eval_batches(stream, 4, 9, 5))
    starts = np.sort(torch.cat([b.x[:, 0] for b in batches]).numpy())
    # 20 starts from 0 to the last full window (1000 - 10 = 990): steps of 990 / 19 = 52.1.
    assert starts[0] == 0 and starts[-1] == 990
    assert set(np.diff(starts).tolist()) <= {52, 53}
    for batch in batches:  # each batch alone spans the stream
        assert batch.x[:, 0].min() < 250 and batch.x[:, 0].max() > 750
