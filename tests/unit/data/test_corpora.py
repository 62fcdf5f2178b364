import collections
from pathlib import Path

import pytest

import moesaic.data as md
from moesaic.data import corpora
from tests.cases import require_debian

MISSING = Path("/nonexistent/moesaic-test")


def _installed(*packages: str) -> bool:
    return all(corpora._INSTALLED[p]() for p in packages)


def _bytes(docs) -> int:
    return sum(len(d.text.encode()) for d in docs)


def _bytes_per_domain(docs) -> dict[str, int]:
    sizes = collections.Counter()
    for d in docs:
        sizes[d.domain] += len(d.text.encode())
    return dict(sizes)


def test_unknown_corpus_name_lists_the_valid_names():
    with pytest.raises(ValueError, match=r"name='shakespeare' is not one of \['fortunes', "):
        md.load_corpus("shakespeare")


@pytest.fixture(scope="module")
def stdlib_docs():
    return md.load_corpus("stdlib")


def test_stdlib_is_the_default_and_holds_5_to_20_mb_of_source(stdlib_docs):
    assert md.DEFAULT_CORPUS == "stdlib"
    assert 5_000_000 <= _bytes(stdlib_docs) <= 20_000_000
    names = [d.name for d in stdlib_docs]
    assert names == sorted(names) and len(set(names)) == len(names)
    assert "stdlib/os.py" in names and "stdlib/json/decoder.py" in names


def test_stdlib_excludes_tests_site_packages_and_caches(stdlib_docs):
    skipped = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    for doc in stdlib_docs:
        parts = doc.name.split("/")
        assert not skipped & set(parts[1:-1]), doc.name
        assert parts[-1].endswith(".py") and not parts[-1].startswith("test_"), doc.name


def test_stdlib_domain_is_the_top_level_package(stdlib_docs):
    domain = {d.name: d.domain for d in stdlib_docs}
    assert domain["stdlib/os.py"] == "toplevel"
    assert domain["stdlib/json/decoder.py"] == "json"
    assert domain["stdlib/email/mime/text.py"] == "email"


@pytest.mark.parametrize(
    "corpus,attribute,packages",
    [
        ("kjv", "BIBLE_PROGRAM", "bible-kjv"),
        ("pydocs", "PYDOCS_ROOT", "python3.11-doc"),
        ("wordnet", "WORDNET_ROOT", "wordnet-base"),
        ("fortunes", "FORTUNES_ROOT", "fortunes-min fortunes"),
        ("jargon", "JARGON_PATH", "jargon-text"),
    ],
)
def test_a_missing_debian_corpus_names_the_apt_get_line(monkeypatch, corpus, attribute, packages):
    monkeypatch.setattr(
        corpora, attribute, MISSING if attribute != "BIBLE_PROGRAM" else str(MISSING)
    )
    with pytest.raises(FileNotFoundError) as error:
        md.load_corpus(corpus)
    assert isinstance(error.value, md.CorpusNotInstalledError)
    assert str(error.value).endswith(f": apt-get install -y {packages}")
    assert str(error.value).startswith(f"corpus {corpus!r} needs the Debian package")


def test_the_kjv_message_is_exactly_one_line(monkeypatch):
    monkeypatch.setattr(corpora, "BIBLE_PROGRAM", str(MISSING))
    with pytest.raises(md.CorpusNotInstalledError) as error:
        md.load_corpus("kjv")
    assert str(error.value) == (
        "corpus 'kjv' needs the Debian package bible-kjv: apt-get install -y bible-kjv"
    )


def test_a_mixture_names_every_missing_package_in_one_command(monkeypatch):
    monkeypatch.setattr(corpora, "BIBLE_PROGRAM", str(MISSING))
    for attribute in ("PYDOCS_ROOT", "WORDNET_ROOT", "FORTUNES_ROOT", "JARGON_PATH"):
        monkeypatch.setattr(corpora, attribute, MISSING)
    with pytest.raises(md.CorpusNotInstalledError) as error:
        md.load_corpus("mixture")
    packages = "bible-kjv python3.11-doc wordnet-base fortunes-min fortunes jargon-text"
    assert str(error.value).endswith(f"apt-get install -y {packages}")


def test_a_mixture_with_one_package_missing_names_only_that_one(monkeypatch):
    installed = {p: (lambda: True) for p in corpora._INSTALLED}
    installed["wordnet-base"] = lambda: False
    monkeypatch.setattr(corpora, "_INSTALLED", installed)
    with pytest.raises(
        md.CorpusNotInstalledError, match=r"package wordnet-base: apt-get install -y wordnet-base$"
    ):
        md.load_mixture()


def test_budget_keeps_original_order_cuts_on_a_character_and_is_stable():
    docs = [md.Document(f"d{i}", "é" * 50, "x") for i in range(10)]  # 100 bytes each
    kept = corpora._take_budget(docs, budget_bytes=351)
    assert _bytes(kept) == 350  # 3 whole + 50 bytes (the 51st byte would split an "é")
    assert [d.name for d in kept] == [d.name for d in docs if d.name in {k.name for k in kept}]
    assert sorted(len(d.text) for d in kept) == [25, 50, 50, 50]
    assert corpora._take_budget(docs, 351) == kept
    assert corpora._take_budget(docs, 10_000) == docs


def test_mixture_budget_must_be_positive():
    with pytest.raises(ValueError, match="budget_bytes=0 must be an int >= 1"):
        md.load_mixture(budget_bytes=0)


# Real data: a missing Debian package fails the test with the command that installs it
# (README's test command runs `moesaic data install --yes` first).


def test_kjv_has_66_books_and_31102_verses():
    require_debian("bible-kjv")
    docs = md.load_corpus("kjv")
    assert len(docs) == 66 and {d.domain for d in docs} == {"kjv"}
    # Numbered books prove headers are matched before verses (DATA.md 1a: else 31,331).
    assert sum(d.text.count("\n") for d in docs) == 31_102
    names = [d.name for d in docs]
    assert names[0] == "kjv/Genesis" and names[-1] == "kjv/Revelation" and "kjv/1 Kings" in names
    assert docs[0].text.startswith("In the beginning God created the heaven and the earth.\n")


def test_pydocs_are_the_rst_sources_labelled_by_folder():
    require_debian("python3.11-doc")
    docs = md.load_corpus("pydocs")
    assert len(docs) > 400 and 8_000_000 < _bytes(docs) < 14_000_000
    assert {"library", "whatsnew", "tutorial", "reference"} <= {d.domain for d in docs}
    assert all(d.name.endswith(".rst.txt") for d in docs)


def test_wordnet_has_every_synset_gloss_in_45_lexicographer_files():
    require_debian("wordnet-base")
    docs = md.load_corpus("wordnet")
    assert len(docs) == 45 and sum(d.text.count("\n") for d in docs) == 117_659
    animal = next(d.text for d in docs if d.name == "wordnet/noun.animal")
    assert "\ndog, domestic dog, Canis familiaris: a member of the genus Canis" in animal


def test_fortunes_are_english_categories_without_markup():
    require_debian("fortunes-min", "fortunes")
    docs = md.load_corpus("fortunes")
    names = {d.name for d in docs}
    assert len(docs) >= 40 and {"fortunes/fortunes", "fortunes/computers"} <= names
    assert not names & {"fortunes/chinese", "fortunes/tang300", "fortunes/song100"}
    assert not any("." in n or "\x1b" in d.text or "\n%\n" in d.text for n, d in zip(names, docs))


def test_jargon_file_is_split_into_its_parts():
    require_debian("jargon-text")
    docs = md.load_corpus("jargon")
    names = [d.name.removeprefix("jargon/") for d in docs]
    letters = list("0ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    assert names == ["front", *letters, "Appendix A", "Appendix B", "Appendix C", "Bibliography"]
    assert 1_500_000 < _bytes(docs) < 1_900_000


ALL_PACKAGES = ("bible-kjv", "python3.11-doc", "wordnet-base", "fortunes-min", "fortunes")


@pytest.fixture(scope="module")
def mixture():
    require_debian(*ALL_PACKAGES, "jargon-text")
    return md.load_corpus("mixture")


def test_mixture_caps_each_domain_at_4_mb(mixture):
    sizes = _bytes_per_domain(mixture)
    assert set(sizes) == {"code", "bible", "docs", "glossary", "fortunes", "jargon"}
    for domain in ("code", "bible", "docs", "glossary"):  # larger than the budget
        assert 4_000_000 - 3 <= sizes[domain] <= 4_000_000, domain
    assert sizes["fortunes"] == _bytes(md.load_corpus("fortunes"))  # smaller: whole
    assert len({d.name for d in mixture}) == len(mixture)


def test_mixture_is_deterministic_and_its_budget_configurable(mixture):
    assert md.load_corpus("mixture") == mixture
    small = md.load_mixture(budget_bytes=200_000)
    assert all(200_000 - 3 <= n <= 200_000 for n in _bytes_per_domain(small).values())
