"""benchmarks/vision.py's tables (the runs themselves are the CLI's, tested in
tests/integration/test_vision.py; ``python benchmarks/vision.py --quick`` runs every stage)."""

from benchmarks.vision import classify_table, probe_table


def test_tables_format_every_row():
    text = classify_table([("vmoe-fashion", 368522, 170890.4, 0.8765, 512.3)])
    assert "| vmoe-fashion | 368,522 | 170,890 | 87.65% | 512 |" in text
    text = probe_table([("mixer-fashion", 0.5, 0.91234, 99.6)])
    assert "| mixer-fashion | 50.00% | 91.23% | 100 |" in text
