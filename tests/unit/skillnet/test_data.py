import hashlib
from pathlib import Path

import numpy as np
import pytest

from moesaic.skillnet import data as sd
from moesaic.skillnet.data import code, emoji_pairs, glyphs, image, sound, text
from moesaic.skillnet.data.common import require_module

MISSING = Path("/nonexistent/moesaic-test")


def _rows(a: np.ndarray) -> set[bytes]:
    return {hashlib.sha256(np.ascontiguousarray(r).tobytes()).digest() for r in a}


def _assert_equal_splits(a, b):
    assert a.keys() == b.keys()
    for s in a:
        assert a[s].keys() == b[s].keys()
        for k in a[s]:
            np.testing.assert_array_equal(a[s][k], b[s][k])


def _assert_disjoint(splits, field):
    sets = {s: _rows(splits[s][field]) for s in sd.SPLITS}
    assert not sets["train"] & sets["val"]
    assert not sets["train"] & sets["test"]
    assert not sets["val"] & sets["test"]


# each generator: (loader, small kwargs, a field whose rows must not repeat across splits)
GENERATORS = {
    "supersense": (sd.load_supersense, {"per_class": 30}, "x"),
    "fashion": (sd.load_fashion_mnist, {"n_train": 300, "n_eval": 100}, "x"),
    "numbers": (sd.load_number_pairs, {"n_train": 120, "n_eval": 40}, "item"),
    "video": (sd.load_moving_digits, {"n_train": 100, "n_eval": 30}, "item"),
    "code": (sd.load_doc_code, {"n_train": 100, "n_eval": 30}, "item"),
    "emoji": (sd.load_emoji_pairs, {"limit": 80}, "text"),
}


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_generator_is_deterministic_under_a_seed_and_its_splits_are_disjoint(name, tmp_path):
    load, kwargs, field = GENERATORS[name]
    a = load(**kwargs, seed=3, data_dir=tmp_path / "a")
    b = load(**kwargs, seed=3, data_dir=tmp_path / "b")  # built again from scratch
    _assert_equal_splits(a, b)
    _assert_disjoint(a, field)
    assert all(len(a[s][field]) > 0 for s in sd.SPLITS)
    other = load(**kwargs, seed=4, data_dir=tmp_path / "a")
    assert not np.array_equal(other["train"][field], a["train"][field])
    # the second call with the same parameters reads the cache file
    assert len(list((tmp_path / "a").glob("*.npz"))) == 2
    _assert_equal_splits(load(**kwargs, seed=3, data_dir=tmp_path / "a"), a)


def test_code_splits_are_file_disjoint(tmp_path):
    d = sd.load_doc_code(n_train=150, n_eval=40, data_dir=tmp_path)
    files = {s: set(d[s]["file"].tolist()) for s in sd.SPLITS}
    assert not files["train"] & files["test"] and not files["train"] & files["val"]
    assert not files["val"] & files["test"]
    # the query is the docstring's first paragraph and the code no longer holds it
    query = sd.decode_bytes(d["test"]["text"][0])
    assert query and query not in sd.decode_bytes(d["test"]["item"][0])


def test_extract_functions_splits_docstring_from_code():
    src = 'def f(a):\n    """Add one.\n\n    More text."""\n    return a + 1\n'
    assert code.extract_functions(src) == [("Add one.", "def f(a):\n    return a + 1")]


def test_number_words_in_english_and_chinese():
    # hand-written: order matters in both languages
    cases = {
        37: ("thirty-seven", "三十七"),
        73: ("seventy-three", "七十三"),
        15: ("fifteen", "十五"),
        40: ("forty", "四十"),
        10: ("ten", "十"),
        7: ("seven", "七"),
    }
    for n, (en, zh) in cases.items():
        assert (glyphs.number_en(n), glyphs.number_zh(n)) == (en, zh)
    with pytest.raises(ValueError, match="n=100"):
        glyphs.number_zh(100)


def test_emoji_pairs_name_each_image_in_english_and_chinese(tmp_path):
    import emoji

    d = sd.load_emoji_pairs(limit=40, data_dir=tmp_path)
    names = {sd.decode_bytes(r) for s in sd.SPLITS for r in d[s]["text"]}
    assert sum(len(d[s]["item"]) for s in sd.SPLITS) == 40
    emoji.config.load_language("zh")
    by_en = {v["en"].strip(":").replace("_", " "): v for v in emoji.EMOJI_DATA.values()}
    for s in sd.SPLITS:
        for en, zh in zip(d[s]["text"], d[s]["text_zh"]):
            assert by_en[sd.decode_bytes(en)]["zh"].strip(":").replace("_", " ") == sd.decode_bytes(
                zh
            )
    assert not any("skin tone" in n for n in names)


def test_number_pairs_captions_match_labels(tmp_path):
    d = sd.load_number_pairs(n_train=20, n_eval=10, data_dir=tmp_path)
    for label, en, zh in zip(d["val"]["label"], d["val"]["text"], d["val"]["text_zh"]):
        assert sd.decode_bytes(en) == glyphs.number_en(int(label) + 10)
        assert sd.decode_bytes(zh) == glyphs.number_zh(int(label) + 10)


def test_moving_digit_moves_in_its_labelled_direction(tmp_path):
    from moesaic.skillnet.data.video import DIRECTIONS

    d = sd.load_moving_digits(n_train=10, n_eval=40, data_dir=tmp_path)
    clips, labels = d["test"]["item"].astype(float), d["test"]["label"]
    ys, xs = np.mgrid[:32, :32]
    for clip, label in zip(clips, labels):
        mass = clip.sum((1, 2))
        cx, cy = (clip * xs).sum((1, 2)) / mass, (clip * ys).sum((1, 2)) / mass
        _, _, dx, dy = DIRECTIONS[label % 8]
        # the sprite translates rigidly: its centre of mass moves by whole pixels per frame
        assert np.sign(round(cx[-1] - cx[0])) == dx and np.sign(round(cy[-1] - cy[0])) == dy


def test_sound_is_deterministic_and_speaker_disjoint(tmp_path):
    a = sound._make("test", ["m1", "f2"], 1, 64, 32, seed=5)
    b = sound._make("test", ["m1", "f2"], 1, 64, 32, seed=5)
    _assert_equal_splits({"test": a}, {"test": b})
    assert a["x"].shape == (2 * len(sound.WORDS), 64, 32)
    assert set(a["speaker"].tolist()) == {sound.VARIANTS.index("m1"), sound.VARIANTS.index("f2")}
    # every split's voices are its own
    order = np.random.default_rng(0).permutation(len(sound.VARIANTS))
    assert len(set(order[:14]) | set(order[14:17]) | set(order[17:])) == len(sound.VARIANTS)


def test_log_mel_of_a_pure_tone_peaks_at_its_frequency():
    t = np.arange(sound.SAMPLE_RATE) / sound.SAMPLE_RATE
    filters = sound._mel_filters(1024, 32, sound.SAMPLE_RATE)
    freqs = np.linspace(0, sound.SAMPLE_RATE / 2, 513)
    for f in (300.0, 1000.0, 3000.0):
        feats = sound.log_mel(np.sin(2 * np.pi * f * t).astype(np.float32), frames=16, n_mels=32)
        peak = feats.mean(0).argmax()
        # the filter that peaks nearest to f
        assert peak == filters[np.abs(freqs - f).argmin()].argmax()


def test_missing_sources_name_the_install_line(monkeypatch, tmp_path):
    monkeypatch.setattr(text, "WORDNET_ROOT", MISSING)
    with pytest.raises(sd.SourceMissingError, match="apt-get install -y wordnet-base"):
        sd.load_supersense(data_dir=tmp_path)
    monkeypatch.setattr(image, "FASHION_ROOT", MISSING)
    with pytest.raises(sd.SourceMissingError, match="apt-get install -y dataset-fashion-mnist"):
        sd.load_fashion_mnist(data_dir=tmp_path)
    monkeypatch.setattr(glyphs, "FONT_DIR", MISSING)
    with pytest.raises(sd.SourceMissingError, match="apt-get install -y fonts-dejavu-core"):
        sd.load_number_pairs(data_dir=tmp_path)
    monkeypatch.setattr(emoji_pairs, "EMOJI_FONT", MISSING)
    with pytest.raises(sd.SourceMissingError, match="apt-get install -y fonts-noto-color-emoji"):
        sd.load_emoji_pairs(limit=5, data_dir=tmp_path)
    monkeypatch.setattr(sound, "ESPEAK", "no-such-espeak-program")
    with pytest.raises(sd.SourceMissingError, match="apt-get install -y espeak-ng"):
        sound.synthesize("one", "en-us", 150, 50)
    with pytest.raises(sd.SourceMissingError, match=r"pip install no_such_pkg"):
        require_module("x", "no_such_module_moesaic", "no_such_pkg")


def test_bad_sizes_are_rejected():
    with pytest.raises(ValueError, match="num_classes=50"):
        sd.load_supersense(num_classes=50)
    with pytest.raises(ValueError, match="canvas=16"):
        sd.load_moving_digits(canvas=16, sprite=12)


def test_bytes_round_trip_and_pad_with_zero():
    rows = sd.encode_bytes(["三十七", "ab"], 12)
    assert rows.shape == (2, 12) and rows[1, 2:].max() == 0
    assert [sd.decode_bytes(r) for r in rows] == ["三十七", "ab"]
