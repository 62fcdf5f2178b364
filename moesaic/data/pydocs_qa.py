"""Passages and held-out questions from the Python 3.11 documentation, for retrieval-grounded
generation (``moesaic retgen``).

The source is Debian's python3.11-doc (the reST sources under
``/usr/share/doc/python3.11/html/_sources``); a missing package raises ``SourceMissingError``
naming the ``apt-get`` line. Everything is deterministic: the same files give the same
passages, questions and splits on every machine.

Passages: each file is cut into passages of at most ``passage_bytes`` UTF-8 bytes along its
sections and paragraphs (a paragraph is split at words only when it exceeds a whole passage). A
passage starts at every section heading and at every described object (``.. function::``,
``.. class::``, ...), whose directive line carries the object's qualified name
(``.. method:: io.IOBase.close()`` for ``close()`` under ``.. class:: IOBase`` of module
``io``, the name Sphinx files it under), so a passage can be found by that name alone. Inline
markup is reduced to its text (``:func:`len``` -> ``len``).

Questions come from the described objects themselves: "What does NAME do?" (a class or an
exception: "What is NAME?") is answered by the first sentence of its description, "What are
the arguments of NAME?" by its parameter list ``(a, b=1)``. A question is kept only when its
answer lies whole inside one passage (its ``passage_id``), and once per question text. The
split is by a hash of NAME, so every question about an object falls in one split; the test
questions' answer passages are in the index, but no pair about a test object is trained on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

from moesaic.data import corpora
from moesaic.data.debian import require_file
from moesaic.data.retrieval import Passage

__all__ = [
    "QUESTION_KINDS",
    "SPLITS",
    "QAPair",
    "DescribedObject",
    "PydocsQA",
    "load_passages",
    "described_objects",
    "make_questions",
    "split_of",
    "split_questions",
    "first_sentence",
    "clean_markup",
    "load_pydocs_qa",
]

QUESTION_KINDS = ("what", "arguments")
SPLITS = ("train", "val", "test")
# Share of the described objects in each held-out split (by a hash of the name).
HELD_OUT = {"test": 0.1, "val": 0.1}

# Directives that describe an object a question can be asked about.
CALLABLES = {
    "function",
    "method",
    "classmethod",
    "staticmethod",
    "coroutinefunction",
    "coroutinemethod",
    "abstractmethod",
    "decorator",
    "decoratormethod",
    "class",
    "exception",
}
# Other object directives: their names are qualified too, but no question is asked.
OBJECTS = CALLABLES | {"attribute", "data", "property"}
CLASSES = {"class", "exception"}
# Directives whose whole block is bookkeeping, not text.
SKIPPED = {"index", "moduleauthor", "sectionauthor", "highlight", "toctree", "testsetup"}

_DIRECTIVE = re.compile(r"^( *)\.\. ([\w:-]+)::(.*)$")
_ADORNMENT = re.compile(r"^([=\-~^\"'`#*+<>_:.])\1{2,}\s*$")
_LABEL_OR_COMMENT = re.compile(r"^ *\.\.(?: |$)(?!.*::)")
_SIGNATURE = re.compile(r"^(?:async\s+)?([A-Za-z_][\w.]*)\s*(\(.*\))?\s*(?:->.*)?$")
_SENTENCE_END = re.compile(r"[.!?](?=\s+[A-Z(\"'`]|$)")

# Inline reST markup reduced to its text, applied in this order.
_MARKUP = [
    (re.compile(r":[\w:.+-]+:`!?~?([^`<]*?)\s*<[^>`]*>`"), r"\1"),  # :ref:`text <target>`
    (re.compile(r":[\w:.+-]+:`!?~?([^`]*)`"), r"\1"),  # :func:`len`
    (re.compile(r"`([^`<]+?)\s*<[^>`]+>`__?"), r"\1"),  # `text <url>`_
    (re.compile(r"``([^`]+)``"), r"\1"),  # ``literal``
    (re.compile(r"\*\*([^*\s][^*]*?)\*\*"), r"\1"),  # **strong**
    (re.compile(r"(?<![\w*])\*([^*\s][^*]*?)\*(?![\w*])"), r"\1"),  # *emphasis*
    (re.compile(r"\s*\[#[\w-]*\]_"), ""),  # footnote references
]


@dataclasses.dataclass(frozen=True)
class QAPair:
    """One question with its answer, the object it asks about and the passage that answers it."""

    question: str
    answer: str
    kind: str  # one of QUESTION_KINDS
    name: str  # the object's qualified name
    source: str  # the reST file, relative to the docs' _sources folder
    passage_id: int  # the passage whose text contains the answer


@dataclasses.dataclass(frozen=True)
class DescribedObject:
    """An object directive of the docs: its file, the passage its directive opens, its
    directive name, qualified names and parameter lists (one per signature), and the first
    paragraph of its description ("" when it has none)."""

    source: str
    passage_id: int
    directive: str
    names: tuple[str, ...]
    params: tuple[str, ...]
    description: str


@dataclasses.dataclass
class PydocsQA:
    """The passages (the retrieval index's documents) and the questions in their splits."""

    passages: list[Passage]
    splits: dict[str, list[QAPair]]


def clean_markup(text: str) -> str:
    """``text`` with inline reST markup reduced to what a reader sees."""
    for pattern, repl in _MARKUP:
        text = pattern.sub(repl, text)
    return text


@dataclasses.dataclass
class _Unit:
    """One piece of a file in reading order: a heading, an object's directive or a paragraph."""

    kind: str  # "heading" | "object" | "text"
    text: str
    indent: int = 0
    directive: str = ""
    names: tuple[str, ...] = ()  # qualified names (objects)
    params: tuple[str, ...] = ()  # parameter lists, one per signature (objects)


def _units(lines: list[str]) -> Iterator[_Unit]:
    """The headings, object directives and paragraphs of one reST file, in order."""
    module, classes = "", []  # classes: (indent, qualified name) of the enclosing classes
    i, paragraph, indent = 0, [], 0

    def flush() -> Iterator[_Unit]:
        if paragraph:
            text = clean_markup(" ".join(part.strip() for part in paragraph))
            yield _Unit("text", " ".join(text.split()), indent)
            paragraph.clear()

    while i < len(lines):
        line = lines[i].rstrip()
        nxt = lines[i + 1].rstrip() if i + 1 < len(lines) else ""
        directive = _DIRECTIVE.match(line)
        if not line.strip():
            yield from flush()
            i += 1
        elif _ADORNMENT.match(nxt) and line.strip() and not line.startswith(" ") and not directive:
            yield from flush()
            yield _Unit("heading", " ".join(clean_markup(line.strip()).split()))
            i += 2
        elif _ADORNMENT.match(line):
            yield from flush()  # an overline or a transition
            i += 1
        elif directive:
            yield from flush()
            width, name = len(directive[1]), directive[2]
            signatures, i = _signatures(lines, i, width, name in OBJECTS)
            rest = signatures[0]
            if name in ("module", "currentmodule"):
                module, classes = ("" if rest == "None" else rest), []
            if name in SKIPPED:
                i = _skip_block(lines, i, width)
            elif name in OBJECTS:
                unit = _object_unit(name, signatures, width, module, classes)
                if unit is not None:
                    yield unit
                    while classes and classes[-1][0] >= width:
                        classes.pop()
                    if name in CLASSES:
                        classes.append((width, unit.names[0]))
            else:
                yield _Unit("text", f".. {name}:: {rest}".rstrip(), width)
            i = _skip_options(lines, i, width)
        elif _LABEL_OR_COMMENT.match(line):
            yield from flush()
            i = _skip_block(lines, i + 1, len(line) - len(line.lstrip()))
        else:
            if not paragraph:
                indent = len(line) - len(line.lstrip())
            paragraph.append(line)
            i += 1
    yield from flush()


def _signatures(lines: list[str], i: int, width: int, several: bool) -> tuple[list[str], int]:
    """The argument text of the directive on line ``i`` (joining lines continued with a
    backslash) and, when ``several``, the further signatures aligned under it; with the index
    of the line after them."""
    rest = _DIRECTIVE.match(lines[i].rstrip())[3].strip()
    i += 1
    while rest.endswith("\\") and i < len(lines):
        rest = rest[:-1].rstrip() + " " + lines[i].strip()
        i += 1
    signatures = [rest]
    while several and i < len(lines) and _continues(lines[i], width):
        signatures.append(lines[i].strip())
        i += 1
    return signatures, i


def _continues(line: str, width: int) -> bool:
    """Whether ``line`` is another signature of the directive at indent ``width``."""
    stripped = line.strip()
    deeper = len(line) - len(line.lstrip()) > width + 3
    return bool(stripped) and deeper and not stripped.startswith(":")


def _skip_options(lines: list[str], i: int, width: int) -> int:
    """Past a directive's ``:option:`` lines."""
    while i < len(lines) and lines[i].strip().startswith(":") and _indent(lines[i]) > width:
        i += 1
    return i


def _skip_block(lines: list[str], i: int, width: int) -> int:
    """Past the lines indented deeper than ``width`` (and blank lines among them)."""
    while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > width):
        i += 1
    return i


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _object_unit(
    directive: str, signatures: list[str], width: int, module: str, classes: list
) -> _Unit | None:
    """The unit of an object directive with each signature's name qualified, or None when no
    signature parses."""
    owner = next((name for indent, name in reversed(classes) if indent < width), "")
    names, params, shown = [], [], []
    for signature in signatures:
        match = _SIGNATURE.match(" ".join(signature.split()))
        if match is None:
            continue
        name, args = match[1], match[2] or ""
        if owner and not name.startswith(owner.rsplit(".", 1)[-1] + "."):
            name = f"{owner}.{name}"
        elif module and not owner and not name.startswith(module + "."):
            name = f"{module}.{name}"
        names.append(name)
        params.append(args)
        shown.append(f".. {directive}:: {name}{args}")
    if not names:
        return None
    return _Unit("object", "\n".join(shown), width, directive, tuple(names), tuple(params))


def _words_within(text: str, room: int) -> tuple[str, str]:
    """(the longest prefix of ``text`` ending at a word that fits in ``room`` bytes, the rest);
    a first word longer than ``room`` is cut at a character."""
    words, taken, size = text.split(" "), [], 0
    for word in words:
        extra = len(word.encode()) + (1 if taken else 0)
        if size + extra > room:
            break
        taken.append(word)
        size += extra
    if not taken:  # one word longer than the room
        head = text.encode()[:room].decode("utf-8", errors="ignore")
        return head, text[len(head) :].lstrip()
    return " ".join(taken), " ".join(words[len(taken) :])


@dataclasses.dataclass
class _Packer:
    """Packs one file's units into passages of at most ``limit`` bytes."""

    source: str
    limit: int
    first_id: int
    passages: list[Passage] = dataclasses.field(default_factory=list)
    section: str = ""
    parts: list[str] = dataclasses.field(default_factory=list)
    glued: bool = False  # the buffer holds just an object's directive: keep its text with it

    @property
    def size(self) -> int:
        return sum(len(p.encode()) + 1 for p in self.parts) - (1 if self.parts else 0)

    def flush(self) -> None:
        if self.parts:
            pid = self.first_id + len(self.passages)
            text = "\n".join(self.parts)
            self.passages.append(Passage(pid, self.source, self.section, text))
        self.parts, self.glued = [], False

    def add(self, text: str) -> None:
        """Add a paragraph: whole when it fits, else after a flush when it fits a fresh
        passage, else split at words across passages."""
        if not text:
            return
        fits_fresh = len(text.encode()) <= self.limit
        if self.size + 1 + len(text.encode()) <= self.limit or not self.parts:
            if fits_fresh:
                self.parts.append(text)
                self.glued = False
                return
        elif fits_fresh and not self.glued:
            self.flush()
            self.parts.append(text)
            return
        while text:  # fill what is left of this passage, then fresh ones
            room = self.limit - self.size - (1 if self.parts else 0)
            if room < 16:  # too little to hold a phrase
                self.flush()
                continue
            head, text = _words_within(text, room)
            self.parts.append(head)
            self.glued = False
            if text:
                self.flush()


def _file_passages(source: str, text: str, limit: int, first_id: int):
    """(passages, described objects) of one file."""
    packer = _Packer(source, limit, first_id)
    objects, pending = [], None  # pending: an object directive waiting for its description

    def described(description: str) -> DescribedObject:
        obj, pid = pending
        return DescribedObject(source, pid, obj.directive, obj.names, obj.params, description)

    for unit in _units(text.splitlines()):
        if unit.kind == "heading":
            packer.flush()
            packer.section = unit.text
            continue
        if pending is not None:  # the first unit after an object's directive describes it
            is_text = unit.kind == "text" and unit.indent > pending[0].indent
            objects.append(described(unit.text if is_text else ""))
            pending = None
        if unit.kind == "object":
            packer.flush()
            pending = (unit, first_id + len(packer.passages))
            packer.add(unit.text)
            packer.glued = True
        else:
            packer.add(unit.text)
    if pending is not None:
        objects.append(described(""))
    packer.flush()
    return packer.passages, objects


def _doc_files(sources: Sequence[str]) -> list[str]:
    """The reST files (relative paths) under the docs root whose path starts with a prefix in
    ``sources``, sorted."""
    root = require_file("pydocs-qa", corpora.PYDOCS_ROOT, "python3.11-doc")
    files = sorted(p.relative_to(root).as_posix() for p in Path(root).rglob("*.rst.txt"))
    chosen = [f for f in files if any(f.startswith(prefix) for prefix in sources)]
    if not chosen:
        raise ValueError(
            f"sources={list(sources)} matches none of the {len(files)} reST files under "
            f"{root} (prefixes such as 'library/' or 'library/json')"
        )
    return chosen


def _read(source: str) -> str:
    return (corpora.PYDOCS_ROOT / source).read_bytes().decode("utf-8", errors="replace")


def load_passages(sources: Sequence[str] = ("library/",), passage_bytes: int = 384) -> list:
    """The passages of the reST files whose relative path starts with one of ``sources``
    (passage ids are their positions in the returned list)."""
    return described_objects(sources, passage_bytes)[0]


def described_objects(
    sources: Sequence[str] = ("library/",), passage_bytes: int = 384
) -> tuple[list[Passage], list[DescribedObject]]:
    """(the passages, the objects they describe) of the reST files under ``sources``."""
    if isinstance(passage_bytes, bool) or not isinstance(passage_bytes, int) or passage_bytes < 64:
        raise ValueError(f"passage_bytes={passage_bytes!r} must be an int >= 64")
    passages, objects = [], []
    for source in _doc_files(sources):
        found, described = _file_passages(source, _read(source), passage_bytes, len(passages))
        passages += found
        objects += described
    return passages, objects


def first_sentence(text: str) -> str:
    """The text up to the end of its first sentence (a '.', '!' or '?' followed by a capital,
    an opening bracket or quote, or the end)."""
    match = _SENTENCE_END.search(text)
    return text[: match.end()] if match else ""


def make_questions(
    passages: list[Passage],
    objects: list[DescribedObject],
    kinds: Sequence[str] = QUESTION_KINDS,
    answer_bytes: int = 96,
) -> list[QAPair]:
    """The questions about ``objects`` (``described_objects``) whose answers fit in
    ``answer_bytes`` and lie whole in one passage, once per question text, in document order."""
    unknown = sorted(set(kinds) - set(QUESTION_KINDS))
    if unknown:
        raise ValueError(f"question kinds {unknown} are not among {list(QUESTION_KINDS)}")
    pairs, seen = [], set()
    for obj in objects:
        if obj.directive not in CALLABLES:
            continue
        name = obj.names[0]
        candidates = []
        if "what" in kinds and obj.description:
            ask = f"What is {name}?" if obj.directive in CLASSES else f"What does {name} do?"
            candidates.append(("what", ask, first_sentence(obj.description)))
        if "arguments" in kinds and obj.params[0] not in ("", "()"):
            candidates.append(("arguments", f"What are the arguments of {name}?", obj.params[0]))
        for kind, question, answer in candidates:
            if not answer or len(answer.encode()) > answer_bytes or question in seen:
                continue
            pid = _passage_with(passages, obj.passage_id, obj.source, answer)
            if pid is None:
                continue
            seen.add(question)
            pairs.append(QAPair(question, answer, kind, name, obj.source, pid))
    return pairs


def _passage_with(passages: list[Passage], start: int, source: str, answer: str) -> int | None:
    """The first passage from ``start`` on, within ``source``'s, whose text holds ``answer``."""
    for pid in range(start, min(start + 4, len(passages))):
        if passages[pid].source != source:
            break
        if answer in passages[pid].text:
            return pid
    return None


def _rank(key: str) -> bytes:
    return hashlib.sha256(f"pydocs-qa:{key}".encode()).digest()


def split_of(name: str) -> str:
    """The split of the questions about object ``name``: a fixed hash of the name, so the split
    never depends on which other objects are loaded."""
    u = int.from_bytes(_rank(name)[:8], "big") / 2**64
    if u < HELD_OUT["test"]:
        return "test"
    return "val" if u < HELD_OUT["test"] + HELD_OUT["val"] else "train"


def split_questions(pairs: list[QAPair], caps: dict[str, int] | None = None) -> dict:
    """``pairs`` by split (``split_of`` their object's name); each split capped at ``caps[split]``
    questions (0 or missing: all), taking them in a fixed hash order so a cap samples every file
    rather than the alphabetical head, then restoring document order."""
    caps = caps or {}
    out = {}
    for split in SPLITS:
        chosen = [p for p in pairs if split_of(p.name) == split]
        cap = caps.get(split, 0)
        if cap and len(chosen) > cap:
            kept = set(sorted(range(len(chosen)), key=lambda i: _rank(chosen[i].question))[:cap])
            chosen = [p for i, p in enumerate(chosen) if i in kept]
        out[split] = chosen
    return out


def load_pydocs_qa(
    *,
    sources: Sequence[str] = ("library/",),
    passage_bytes: int = 384,
    kinds: Sequence[str] = QUESTION_KINDS,
    answer_bytes: int = 96,
    caps: dict[str, int] | None = None,
) -> PydocsQA:
    """Passages and split questions of the reST files under ``sources`` (path prefixes relative
    to the docs' ``_sources``, e.g. ``("library/",)`` or ``("library/json",)``).

    Raises:
        SourceMissingError: python3.11-doc is not installed (the message names the apt line).
    """
    passages, objects = described_objects(sources, passage_bytes)
    pairs = make_questions(passages, objects, kinds, answer_bytes)
    return PydocsQA(passages, split_questions(pairs, caps))
