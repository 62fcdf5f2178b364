"""benchmarks/retgen.py --quick: the four runs train, are scored and the tables print; a second
call reuses the finished runs."""

import json

from tests.cases import require_debian


def test_quick_retgen_benchmark_prints_its_tables(tmp_path, capsys):
    require_debian("python3.11-doc")
    from benchmarks.retgen import main

    argv = ["--quick", "--threads", "1", "--out", str(tmp_path)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert (
        "| run | test nats/token | vs no retrieval | exact match | recall@2 | training s |" in text
    )
    for row in (
        "RetGen: mixture, joint retriever",
        "mixture, fixed BM25 retriever",
        "no retrieval",
    ):
        assert f"| {row} |" in text
    record = json.loads((tmp_path / "results.json").read_text())
    assert set(record["runs"]) == {"mixture-joint", "mixture-fixed", "concat", "none"}
    assert record["runs"]["none"]["nats_per_token"] > 0
    assert main(argv) == 0  # finished runs are reused, not trained again
    again = json.loads((tmp_path / "results.json").read_text())

    def untimed(runs):
        return {name: {k: v for k, v in r.items() if k != "eval_s"} for name, r in runs.items()}

    assert untimed(again["runs"]) == untimed(record["runs"])
