"""benchmarks/classic.py runs in a quick mode and prints every table."""

import json


def test_quick_run_prints_every_table_and_parallel_experts_equal_serial(tmp_path, capsys):
    from benchmarks.classic import main

    out = tmp_path / "classic.json"
    argv = ["--train", "400", "--test", "100", "--epochs", "1", "--experts", "2", "--out", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    for row in ("| dense |", "| MILE |", "| MELE, balanced |", "| hard MoE |", "**MILE** (NMI"):
        assert row in text
    rows = json.loads(out.read_text())["per_seed"][0]["rows"]
    assert [t["identical"] for t in rows["timing"]] == [True, True]
    assert rows["specialist on tops"]["subsets"] == [[0, 2, 4, 6]]
