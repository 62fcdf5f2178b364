import pytest

import moesaic.data as md


def _docs(n: int, prefix: str = "doc") -> list[md.Document]:
    return [md.Document(f"{prefix}{i}", f"text {i}", "d") for i in range(n)]


def test_split_is_deterministic_disjoint_and_covers_every_document():
    docs = _docs(400)
    train, val = md.split_documents(docs, val_fraction=0.1, seed=3)
    again = md.split_documents(docs, val_fraction=0.1, seed=3)
    assert (train, val) == again
    names_train, names_val = {d.name for d in train}, {d.name for d in val}
    assert not names_train & names_val
    assert names_train | names_val == {d.name for d in docs}
    assert train == [d for d in docs if d.name in names_train]  # input order kept


def test_val_share_is_close_to_the_fraction():
    # 4000 documents at 5 %: mean 200, standard deviation about 14.
    _, val = md.split_documents(_docs(4000), val_fraction=0.05)
    assert 150 <= len(val) <= 250


def test_adding_documents_moves_no_existing_document():
    docs = _docs(300)
    _, val = md.split_documents(docs, seed=1)
    _, val_more = md.split_documents(docs + _docs(50, prefix="new"), seed=1)
    assert {d.name for d in val_more if d.name.startswith("doc")} == {d.name for d in val}


def test_another_seed_gives_another_split():
    docs = _docs(300)
    assert md.split_documents(docs, seed=0)[1] != md.split_documents(docs, seed=1)[1]


@pytest.mark.parametrize("fraction", [0.001, 0.999])
def test_both_sides_are_non_empty_from_two_documents(fraction):
    for n in (2, 3, 5):
        train, val = md.split_documents(_docs(n), val_fraction=fraction)
        assert len(train) >= 1 and len(val) >= 1 and len(train) + len(val) == n


def test_a_single_document_stays_on_one_side():
    train, val = md.split_documents(_docs(1))
    assert len(train) + len(val) == 1


def test_split_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"val_fraction=1.0 must lie in \(0, 1\)"):
        md.split_documents(_docs(3), val_fraction=1.0)
    with pytest.raises(ValueError, match=r"repeated: \['doc0'\]"):
        md.split_documents(_docs(2) + _docs(1))
