"""benchmarks/finetune.py: its tables read every stage's results, and its knowledge-inheritance
verdict is the interpolated step at which the inheriting run reaches the from-scratch loss."""

import json

from benchmarks.finetune import VARIANTS, _slug, tables


def _write(path, payload):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload))


def test_tables_cover_every_stage(tmp_path):
    runs = {
        "moe": {"params_total": 1000, "params_activated": 100, "final_val_loss": 1.5},
        "dense": {"params_total": 100, "params_activated": 100, "final_val_loss": 1.7},
    }
    _write(tmp_path / "pretrain" / "compare.json", {"runs": runs})
    for i, name in enumerate(VARIANTS):
        result = {"test_acc": 0.5 + i / 100, "trained_params": 10 + i, "total_params": 99}
        _write(tmp_path / "finetune" / "fortune" / _slug(name) / "result.json", result)
    scratch = [{"step": 100, "val_loss": 2.0}, {"step": 200, "val_loss": 1.6}]
    inherited = [{"step": 100, "val_loss": 1.8}, {"step": 200, "val_loss": 1.4}]
    _write(tmp_path / "inherit" / "scratch" / "done.json", {"evals": scratch})
    _write(tmp_path / "inherit" / "inherited" / "done.json", {"evals": inherited})
    for name, loss in (("student", 1.7), ("alone", 1.9)):
        params = {"total": 800, "activated": 90.0}
        done = {"evals": [{"val_loss": loss}], "layers": 2, "params": params}
        _write(tmp_path / "students" / name / "done.json", done)
    text = tables(tmp_path, ["supersense", "fortune"])
    assert "| moe | 1,000 | 100 | 1.5000 |" in text
    assert "| moe, expert dropout 0.4 | - | 50.0% | 10 of 99 |" in text
    assert "| dense, prompt tuning | - | 54.0% | 14 of 99 |" in text
    assert "trained / all parameters (fortune)" in text
    # the inheriting run reaches 1.6 halfway between its evals at steps 100 (1.8) and 200 (1.4)
    assert "| inheriting from the pre-trained 2-layer MoE | 1.4000 | 150 |" in text
    assert "| teacher (the deeper MoE, from scratch) | - | 1.6000 | - | - |" in text
    assert "| same student, random start, no teacher | 2 | 1.9000 | 800 | 90 |" in text
