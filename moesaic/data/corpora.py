"""Text corpora for language modelling, read offline from the Python install and Debian packages.

``CORPORA`` maps a name to a loader returning ``Document`` s in a deterministic order;
``load_corpus(name)`` calls one. ``"stdlib"`` (the default) is on every machine; the others need
a Debian package and raise ``CorpusNotInstalledError`` naming the ``apt-get`` line when it is
missing. Nothing is ever downloaded. Document names are unique and stable, so a split by name
(``moesaic.data.split_documents``) is stable too.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import shutil
import subprocess
import sysconfig
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

__all__ = [
    "CORPORA",
    "DEFAULT_CORPUS",
    "CorpusNotInstalledError",
    "Document",
    "load_corpus",
    "load_mixture",
]

DEFAULT_CORPUS = "stdlib"

# Where the Debian packages put their text; module attributes so tests can point them elsewhere.
BIBLE_PROGRAM = "bible"
PYDOCS_ROOT = Path("/usr/share/doc/python3.11/html/_sources")
WORDNET_ROOT = Path("/usr/share/wordnet")
FORTUNES_ROOT = Path("/usr/share/games/fortunes")
JARGON_PATH = Path("/usr/share/doc/jargon-text/jargon.txt.gz")

_INSTALLED: dict[str, Callable[[], bool]] = {
    "bible-kjv": lambda: shutil.which(BIBLE_PROGRAM) is not None,
    "python3.11-doc": lambda: PYDOCS_ROOT.is_dir(),
    "wordnet-base": lambda: (WORDNET_ROOT / "data.noun").is_file(),
    "fortunes-min": lambda: (FORTUNES_ROOT / "fortunes").is_file(),
    "fortunes": lambda: (FORTUNES_ROOT / "computers").is_file(),
    "jargon-text": lambda: JARGON_PATH.is_file(),
}


@dataclass(frozen=True)
class Document:
    """One unit of a corpus (a file, a book, a category); splits never cut through one."""

    name: str
    text: str
    domain: str


class CorpusNotInstalledError(FileNotFoundError):
    """A corpus's Debian packages are missing; the message holds the command that installs them."""

    def __init__(self, corpus: str, packages: Iterable[str]) -> None:
        self.corpus = corpus
        self.packages = tuple(packages)
        noun = "package" if len(self.packages) == 1 else "packages"
        super().__init__(
            f"corpus {corpus!r} needs the Debian {noun} {', '.join(self.packages)}: "
            f"apt-get install -y {' '.join(self.packages)}"
        )


def _require(corpus: str, packages: Iterable[str]) -> None:
    missing = [p for p in packages if not _INSTALLED[p]()]
    if missing:
        raise CorpusNotInstalledError(corpus, missing)


_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def load_stdlib() -> list[Document]:
    """The standard library's own ``.py`` files (about 12 MB), without tests or site-packages.

    Sorted by relative path; the domain is the top-level package, or ``"toplevel"``.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    rel_paths = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in _STDLIB_SKIP_DIRS]
        rel = Path(folder).relative_to(root)
        rel_paths += [(rel / f).as_posix() for f in files if _is_stdlib_source(f)]
    if not rel_paths:
        raise FileNotFoundError(f"corpus 'stdlib' found no .py files under {root}")
    docs = []
    for rel in sorted(rel_paths):
        text = (root / rel).read_bytes().decode("utf-8", errors="replace")
        domain = rel.split("/")[0] if "/" in rel else "toplevel"
        docs.append(Document(f"stdlib/{rel}", text, domain))
    return docs


def _is_stdlib_source(filename: str) -> bool:
    return filename.endswith(".py") and not filename.startswith("test_")


_KJV_CHAPTER = re.compile(r"^((?:[1-3] )?[A-Z][A-Za-z ]+?) (\d+)$")
_KJV_VERSE = re.compile(r"^\s*(\d+) (.*)$")


def load_kjv() -> list[Document]:
    """The King James Bible, one document per book (66), one verse per line."""
    _require("kjv", ["bible-kjv"])
    # A huge line width stops `bible` wrapping verses at 80 columns.
    env = {**os.environ, "COLUMNS": "100000"}
    out = subprocess.run(
        [BIBLE_PROGRAM, "-l100000", "gen1:1-rev22:21"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    books: dict[str, list[str]] = {}
    book = None
    for line in out.splitlines():
        # Headers first: "1 Kings 4" would also match the verse pattern (DATA.md 1a).
        if header := _KJV_CHAPTER.match(line):
            book = header[1]
            books.setdefault(book, [])
        elif (verse := _KJV_VERSE.match(line)) and book is not None:
            books[book].append(verse[2])
    return [Document(f"kjv/{b}", "\n".join(v) + "\n", "kjv") for b, v in books.items()]


def load_pydocs() -> list[Document]:
    """The Python 3.11 documentation's reST sources; the domain is the first sub-folder."""
    _require("pydocs", ["python3.11-doc"])
    docs = []
    rel_paths = [p.relative_to(PYDOCS_ROOT).as_posix() for p in PYDOCS_ROOT.rglob("*.rst.txt")]
    for rel in sorted(rel_paths):
        text = (PYDOCS_ROOT / rel).read_bytes().decode("utf-8", errors="replace")
        domain = rel.split("/")[0] if "/" in rel else "toplevel"
        docs.append(Document(f"pydocs/{rel}", text, domain))
    return docs


# WordNet's 45 lexicographer files, indexed by the number in each data line (lexnames(5WN)).
WORDNET_LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute "
    "noun.body noun.cognition noun.communication noun.event noun.feeling noun.food noun.group "
    "noun.location noun.motive noun.object noun.person noun.phenomenon noun.plant "
    "noun.possession noun.process noun.quantity noun.relation noun.shape noun.state "
    "noun.substance noun.time verb.body verb.change verb.cognition verb.communication "
    "verb.competition verb.consumption verb.contact verb.creation verb.emotion verb.motion "
    "verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl"
).split()


def load_wordnet() -> list[Document]:
    """WordNet 3.0 glosses as "lemma, lemma: gloss" lines, one document per lexicographer file."""
    _require("wordnet", ["wordnet-base"])
    lines: dict[int, list[str]] = {}
    for pos in ("noun", "verb", "adj", "adv"):
        for fields, gloss in wordnet_synsets(WORDNET_ROOT / f"data.{pos}"):
            lexfile, lemmas = _wordnet_lemmas(fields)
            lines.setdefault(lexfile, []).append(f"{', '.join(lemmas)}: {gloss.strip()}")
    return [
        Document(f"wordnet/{WORDNET_LEXNAMES[n]}", "\n".join(lines[n]) + "\n", "wordnet")
        for n in sorted(lines)
    ]


def wordnet_synsets(path: Path) -> Iterator[tuple[list[str], str]]:
    """(header fields "offset lexfile pos ...", gloss) of every synset line of a WordNet
    ``data.<pos>`` file, the licence header skipped."""
    for line in path.read_text(encoding="latin-1").splitlines():
        if line.startswith("  ") or " | " not in line:
            continue  # the licence header
        head, gloss = line.split(" | ", 1)
        yield head.split(), gloss


def _wordnet_lemmas(fields: list[str]) -> tuple[int, list[str]]:
    """(lexicographer file number, lemmas) of "offset lexfile pos w_cnt word lex_id ..." fields."""
    count = int(fields[3], 16)
    words = fields[4 : 4 + 2 * count : 2]
    # Adjective markers like "(p)" and underscores for spaces are WordNet's syntax, not text.
    return int(fields[1]), [re.sub(r"\([a-z]+\)$", "", w).replace("_", " ") for w in words]


_FORTUNES_NOT_ENGLISH = {"chinese", "tang300", "song100"}  # fortunes-zh puts these beside ours
_ANSI_COLOUR = re.compile(r"\x1b\[[0-9;]*m")


def load_fortunes() -> list[Document]:
    """English fortune cookies, one document per category, items separated by a blank line.

    Only files directly in the fortunes folder: other languages and the offensive set live in
    sub-folders.
    """
    return [
        Document(f"fortunes/{name}", "\n\n".join(items) + "\n", "fortunes")
        for name, items in fortune_items().items()
    ]


def fortune_items() -> dict[str, list[str]]:
    """The English fortunes by category (file name), each a list of its non-empty items."""
    _require("fortunes", ["fortunes-min", "fortunes"])
    out = {}
    for path in sorted(FORTUNES_ROOT.iterdir()):
        if not path.is_file() or "." in path.name or path.name in _FORTUNES_NOT_ENGLISH:
            continue  # .dat indexes, .u8 links
        text = _ANSI_COLOUR.sub("", path.read_bytes().decode("utf-8", errors="replace"))
        items = [item.strip("\n") for item in re.split(r"^%$", text, flags=re.MULTILINE)]
        out[path.name] = [item for item in items if item]
    return out


# The Jargon File's parts: front matter, the lexicon's letter sections, appendices, bibliography.
# Its headings use no-break spaces ("Appendix\xa0A."), which \s matches.
_JARGON_PART = re.compile(r"^(?:  ([0-9A-Z])|(Appendix\s[A-C])\..*|(Bibliography))$", re.MULTILINE)


def load_jargon() -> list[Document]:
    """The Jargon File 4.4.7, one document per part (front matter, lexicon letters, appendices)."""
    _require("jargon", ["jargon-text"])
    with gzip.open(JARGON_PATH, "rt", encoding="utf-8", errors="replace") as f:
        text = f.read()
    starts = [(0, "front")] + [
        (m.start(), " ".join(next(filter(None, m.groups())).split()))
        for m in _JARGON_PART.finditer(text)
    ]
    ends = [start for start, _ in starts[1:]] + [len(text)]
    return [
        Document(f"jargon/{label}", text[start:end], "jargon")
        for (start, label), end in zip(starts, ends)
    ]


# The mixture's domain labels and the corpus each one draws from.
MIXTURE_DOMAINS = {
    "code": "stdlib",
    "bible": "kjv",
    "docs": "pydocs",
    "glossary": "wordnet",
    "fortunes": "fortunes",
    "jargon": "jargon",
}
_PACKAGES = {
    "stdlib": [],
    "kjv": ["bible-kjv"],
    "pydocs": ["python3.11-doc"],
    "wordnet": ["wordnet-base"],
    "fortunes": ["fortunes-min", "fortunes"],
    "jargon": ["jargon-text"],
}


def load_mixture(budget_bytes: int = 4_000_000) -> list[Document]:
    """Six domains, each capped at ``budget_bytes`` of UTF-8 text so they are comparable.

    Each domain takes its corpus's documents in a fixed pseudo-random order (sha256 of the
    name), so a capped domain samples its whole source rather than the alphabetical head; the
    document that crosses the budget is cut there. A domain smaller than the budget comes whole.
    """
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes < 1:
        raise ValueError(f"budget_bytes={budget_bytes!r} must be an int >= 1")
    _require("mixture", [p for corpus in MIXTURE_DOMAINS.values() for p in _PACKAGES[corpus]])
    docs = []
    for domain, corpus in MIXTURE_DOMAINS.items():
        docs += [replace(d, domain=domain) for d in _take_budget(CORPORA[corpus](), budget_bytes)]
    return docs


def _take_budget(docs: list[Document], budget_bytes: int) -> list[Document]:
    """Documents in sha256(name) order up to ``budget_bytes``, kept in their original order."""
    rank = {d.name: hashlib.sha256(f"budget:{d.name}".encode()).digest() for d in docs}
    left, kept = budget_bytes, {}
    for doc in sorted(docs, key=lambda d: rank[d.name]):
        if left == 0:
            break
        data = doc.text.encode("utf-8")
        if len(data) > left:
            # Cut on a byte; "ignore" drops a character the cut splits.
            doc = replace(doc, text=data[:left].decode("utf-8", errors="ignore"))
        kept[doc.name] = doc
        left -= min(left, len(data))
    return [kept[d.name] for d in docs if d.name in kept]


CORPORA: dict[str, Callable[[], list[Document]]] = {
    "stdlib": load_stdlib,
    "kjv": load_kjv,
    "pydocs": load_pydocs,
    "wordnet": load_wordnet,
    "fortunes": load_fortunes,
    "jargon": load_jargon,
    "mixture": load_mixture,
}


def load_corpus(name: str = DEFAULT_CORPUS) -> list[Document]:
    """The documents of corpus ``name`` (a key of ``CORPORA``), in a deterministic order."""
    if name not in CORPORA:
        raise ValueError(f"corpus name={name!r} is not one of {sorted(CORPORA)}")
    return CORPORA[name]()
