import json

import pytest

from moesaic.cli.main import main as moesaic_main

TINY = ["--train", "240", "--test", "100", "--epochs", "1", "--hidden", "8", "--no-progress"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["mile", "--experts", "0"], "--experts=0 must be >= 1"),
        (["hard", "--train", "70000"], "--train=70000 must be <= 60000"),
        (["mele", "--lr", "nan"], "--lr=nan must be a finite float"),
        (["specialists", "--clusters", "11"], "--clusters=11 must be <= 10"),
        (["hard", "--threads", "0"], "--threads=0 must be >= 1"),
        (["mile", "--json", "/no/such/folder/out.json"], "folder /no/such/folder does not exist"),
    ],
)
def test_bad_input_is_one_line_naming_the_option_and_exits_2_before_any_work(
    argv, message, capsys, monkeypatch
):
    import moesaic.train.classic_runs as runs

    monkeypatch.setattr(runs, "load_data", lambda setup: pytest.fail("work started"))
    assert moesaic_main(["classic", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("moesaic classic: error: ") and message in err


def test_hard_and_specialists_run_end_to_end_on_fashion_mnist_and_write_json(tmp_path, capsys):
    out = tmp_path / "hard.json"
    assert moesaic_main(["classic", "hard", *TINY, "--experts", "2", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    dense, hard = record["results"]
    assert hard["name"] == "hard MoE" and hard["activated"] == dense["activated"]
    assert sum(map(sum, hard["table"])) == 100 and 0.0 <= hard["nmi"] <= 1.0
    assert "| hard MoE |" in capsys.readouterr().out
    out = tmp_path / "spec.json"
    argv = ["classic", "specialists", *TINY, "--spec-epochs", "1", "--json", str(out)]
    assert moesaic_main(argv) == 0
    record = json.loads(out.read_text())["results"]
    assert set(record["overall"]) == {
        "generalist",
        "generalist + specialists",
        "distilled student",
        "generalist, trained longer",
    }
    assert all(len(s) >= 2 for s in record["subsets"])
