"""Offline datasets for SkillNet, one per modality, each a ``Splits`` of numpy arrays.

=================  ========================================  ==============================
loader             task                                      source
=================  ========================================  ==============================
load_supersense    WordNet gloss -> supersense (text)        Debian wordnet-base
load_fashion_mnist Fashion-MNIST images                      Debian dataset-fashion-mnist
load_spoken_words  spoken digits (en / zh) and words (sound) Debian espeak-ng
load_moving_digits moving-digit clips <-> captions (video)   generated, fonts-dejavu-core
load_doc_code      docstring -> stdlib function (code)       the Python install
load_number_pairs  two-digit images <-> en / zh numerals     generated, fonts-dejavu-core
load_emoji_pairs   emoji images <-> en / zh names            fonts-noto-color-emoji, emoji
=================  ========================================  ==============================

Generated data is cached under ``data_dir`` (default ``$MOESAIC_DATA_DIR`` or
``~/.cache/moesaic/data``) keyed by the loader's parameters, and is deterministic under ``seed``.
A missing source raises ``SourceMissingError`` whose message is the install command.
"""

from moesaic.skillnet.data.code import load_doc_code
from moesaic.skillnet.data.common import (
    SPLITS,
    SourceMissingError,
    Splits,
    decode_bytes,
    default_data_dir,
    encode_bytes,
)
from moesaic.skillnet.data.emoji_pairs import load_emoji_pairs
from moesaic.skillnet.data.image import load_fashion_mnist
from moesaic.skillnet.data.pairs import load_number_pairs
from moesaic.skillnet.data.sound import load_spoken_words
from moesaic.skillnet.data.text import load_supersense
from moesaic.skillnet.data.video import load_moving_digits

__all__ = [
    "SPLITS",
    "SourceMissingError",
    "Splits",
    "decode_bytes",
    "default_data_dir",
    "encode_bytes",
    "load_doc_code",
    "load_emoji_pairs",
    "load_fashion_mnist",
    "load_moving_digits",
    "load_number_pairs",
    "load_spoken_words",
    "load_supersense",
]
