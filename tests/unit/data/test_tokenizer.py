import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import moesaic.data as md

TRICKY = "héllo, 世界 😀\n\ttabs  and   runs\r\nNUL\x00 end"


def test_byte_tokenizer_encodes_utf8_bytes_as_uint8():
    ids = md.ByteTokenizer().encode("é😀")
    assert ids.dtype == np.uint8
    assert ids.tolist() == list("é😀".encode())  # 2 + 4 bytes


@pytest.mark.parametrize("kind", ["list", "ndarray", "LongTensor"])
def test_byte_tokenizer_round_trips_non_ascii_text_from_any_id_container(kind):
    tok = md.ByteTokenizer()
    ids = tok.encode(TRICKY)
    container = {
        "list": ids.tolist(),
        "ndarray": ids,
        "LongTensor": torch.from_numpy(ids.astype(np.int64)),
    }[kind]
    assert tok.decode(container) == TRICKY


def test_byte_decode_replaces_a_cut_character_instead_of_failing():
    ids = md.ByteTokenizer().encode("aé")[:-1]  # drop the second byte of "é"
    assert md.ByteTokenizer().decode(ids) == "a\ufffd"


def test_byte_decode_rejects_ids_outside_the_vocabulary():
    with pytest.raises(ValueError, match=r"\[0, 256\).*max=256"):
        md.ByteTokenizer().decode([1, 256])


def test_byte_tokenizer_json_round_trip_and_dispatch():
    tok = md.ByteTokenizer()
    assert isinstance(md.ByteTokenizer.from_json(tok.to_json()), md.ByteTokenizer)
    assert isinstance(md.tokenizer_from_json(tok.to_json()), md.ByteTokenizer)
    with pytest.raises(ValueError, match="type='bpe' must be 'byte'"):
        md.ByteTokenizer.from_json(json.dumps({"type": "bpe"}))


def test_build_tokenizer_by_name_and_its_errors():
    assert md.build_tokenizer("byte").vocab_size == 256
    with pytest.raises(ValueError, match=r"name='wordpiece' is not one of \['byte', 'bpe'\]"):
        md.build_tokenizer("wordpiece")
    with pytest.raises(ValueError, match="needs texts and vocab_size"):
        md.build_tokenizer("bpe", texts=["abc"])
    with pytest.raises(ValueError, match="vocab_size=512 must be None or 256"):
        md.build_tokenizer("byte", vocab_size=512)


def test_bpe_without_the_extra_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # makes `import tokenizers` fail
    with pytest.raises(ImportError, match=r"pip install 'moesaic\[bpe\]'"):
        md.BPETokenizer.train(["some text"], vocab_size=300)


def test_bpe_vocab_smaller_than_the_byte_alphabet_is_rejected():
    with pytest.raises(ValueError, match="vocab_size=100 must be >= 256"):
        md.BPETokenizer.train(["abc"], vocab_size=100)


# BPE proper: needs the optional `tokenizers` package.


def _training_texts() -> list[str]:
    return [Path(json.__file__).read_text(), Path(pytest.__file__).read_text()] * 2


@pytest.fixture(scope="module")
def bpe():
    pytest.importorskip("tokenizers")
    return md.BPETokenizer.train(_training_texts(), vocab_size=400)


def test_bpe_round_trips_text_it_never_saw(bpe):
    ids = bpe.encode(TRICKY)
    assert ids.dtype == np.int32
    assert bpe.decode(ids) == TRICKY
    assert bpe.decode(torch.from_numpy(ids.astype(np.int64))) == TRICKY


def test_bpe_learns_merges_that_shorten_text(bpe):
    text = _training_texts()[0]
    assert bpe.vocab_size == 400
    assert len(bpe.encode(text)) < 0.7 * len(text.encode())


def test_bpe_json_round_trip_encodes_identically(bpe):
    again = md.tokenizer_from_json(bpe.to_json())
    assert isinstance(again, md.BPETokenizer)
    assert again.vocab_size == bpe.vocab_size
    np.testing.assert_array_equal(again.encode(TRICKY), bpe.encode(TRICKY))


def test_build_tokenizer_bpe_trains_one(bpe):
    tok = md.build_tokenizer("bpe", texts=["aaaa bbbb aaaa"] * 10, vocab_size=260)
    assert isinstance(tok, md.BPETokenizer) and 256 < tok.vocab_size <= 260
