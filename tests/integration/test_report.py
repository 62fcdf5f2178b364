"""End to end: a tiny run on the multi-domain corpus logs routing statistics, ``moesaic report``
builds a self-contained page from it, and headless Chromium shows every plot."""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from moesaic.cli.main import main as cli
from moesaic.metrics import build_report, count_parameters, plots, read_routing
from moesaic.train.compare import run_compare
from moesaic.train.config import apply_overrides
from moesaic.train.recipes import get_recipe
from moesaic.train.trainer import Trainer
from tests.cases import require_debian

SHORT = ["train.steps=10", "train.eval_every=5", "train.log_every=5", "data.corpus=mixture"]


def _cfg():
    return apply_overrides(get_recipe("lm-moe-test"), SHORT)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("report") / "run"
    trainer = Trainer(_cfg(), run_dir, progress=False)
    trainer.fit()
    return run_dir, trainer


def test_training_logs_routing_rows_and_domain_affinity(run):
    run_dir, trainer = run
    rows = read_routing(run_dir / "routing.jsonl")
    assert [(r["step"], r["layer"]) for r in rows] == [(5, "blocks.1.ffn"), (10, "blocks.1.ffn")]
    B, S = trainer.cfg.data.batch_size, trainer.cfg.data.seq_len
    assert all(sum(r["tokens_per_expert"]) == B * S for r in rows)  # top-1, dropless
    affinity = json.loads((run_dir / "affinity.json").read_text())
    assert affinity["labels"] == trainer.data.train.domains and len(affinity["labels"]) == 6
    # every token of both logged batches is counted once, under its window's domain
    assert sum(map(sum, affinity["layers"]["blocks.1.ffn"])) == 2 * B * S


def test_report_is_self_contained_and_counts_the_trained_model(run):
    run_dir, trainer = run
    report = build_report(run_dir, device="a100", devices=2)
    page = report.html_path.read_text()
    sources = re.findall(r'<img [^>]*src="([^"]*)"', page)
    assert len(sources) == len(report.images) == 4  # loss, routing, expert load, affinity
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    assert "http://" not in page and "https://" not in page
    for image in report.images:
        assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({image.name})" in report.md_path.read_text()
    assert "<title>moesaic report: lm-moe-test (run)</title>" in page  # the recipe in the title
    (summary,) = report.runs
    assert summary.count.total_params == count_parameters(trainer.model).total
    assert summary.train_s == pytest.approx(trainer.train_s)
    # 2 x 400 W x 1.58 PUE over the measured training seconds
    assert summary.energy.energy_kwh == pytest.approx(trainer.train_s / 3600 * 0.8 * 1.58)


def _loaded_images(page, tmp_path) -> tuple[int, int]:
    """(images, images that decoded) in ``page`` as headless Chromium renders it."""
    probe = (
        "<script>window.addEventListener('load', function () {"
        "var all = Array.prototype.slice.call(document.images);"
        "var ok = all.filter(function (i) { return i.complete && i.naturalWidth > 0; });"
        "document.body.setAttribute('data-images', all.length);"
        "document.body.setAttribute('data-loaded', ok.length); });</script>"
    )
    path = tmp_path / "probe.html"
    path.write_text(page.replace("</body>", probe + "</body>"))
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom",
    ]  # fmt: skip
    out = subprocess.run(
        ["chromium", *flags, path.as_uri()], capture_output=True, text=True, timeout=120
    )
    body = re.search(r'<body data-images="(\d+)" data-loaded="(\d+)"', out.stdout)
    assert body, f"chromium printed no probed DOM (exit {out.returncode}): {out.stderr[-800:]}"
    return int(body.group(1)), int(body.group(2))


def test_report_renders_every_image_in_headless_chromium(run, tmp_path):
    require_debian("chromium")
    run_dir, _ = run
    page = build_report(run_dir).html_path.read_text()
    assert _loaded_images(page, tmp_path) == (4, 4)
    broken = page.replace("</body>", '<img src="data:image/png;base64,AAAA"></body>')
    assert _loaded_images(broken, tmp_path) == (5, 4)  # the probe does see a broken image


def test_report_of_a_compare_run_shows_both_models(tmp_path, capsys):
    cfg = apply_overrides(_cfg(), ["train.steps=6", "train.eval_every=3", "train.log_every=3"])
    run_compare(cfg, tmp_path, progress=False)
    assert cli(["report", str(tmp_path), "--device-preset", "h100"]) == 0
    table = capsys.readouterr().out
    assert re.search(r"^\| moe \| lm-moe-test \|", table, re.M)
    assert re.search(r"^\| dense \| lm-moe-test-dense \|", table, re.M)
    assert "1 x 700 W" in table
    names = sorted(p.name for p in tmp_path.glob("report_*.png"))
    assert names == [
        "report_affinity_moe.png",
        "report_compare.png",
        "report_load_moe.png",
        "report_loss.png",
        "report_routing_moe.png",
    ]
    assert (tmp_path / "dense" / "routing.jsonl").read_text() == ""  # no MoE layer to log


def test_dropless_runs_have_no_dropped_panel_and_unsampled_labels_no_row():
    rows = [{"step": 1, "dropped_fraction": 0.0}, {"step": 2, "dropped_fraction": 0.0}]
    assert [k for k, _ in plots.routing_panels(rows)] == ["load_cv", "entropy", "dead_experts"]
    rows[1]["dropped_fraction"] = 0.01
    assert "dropped_fraction" in [k for k, _ in plots.routing_panels(rows)]
    affinity = {"labels": ["a", "b", "c"], "layers": {"l0": [[1, 2], [0, 0], [0, 3]]}}
    labels, layers = plots.sampled_affinity(affinity)
    assert labels == ["a", "c"] and layers == {"l0": [[1, 2], [0, 3]]}
