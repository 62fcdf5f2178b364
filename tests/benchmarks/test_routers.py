"""benchmarks/routers.py trains every router on one recipe and prints one table."""

import json

import pytest

from benchmarks.routers import NOT_FOR_LM, main, router_config, routing_summary
from moesaic.train.recipes import get_recipe


def test_table_has_a_row_per_router_and_names_those_not_run(tmp_path, capsys):
    args = ["--recipe", "lm-moe-test", "--steps", "4", "--set", "train.threads=1"]
    plot = tmp_path / "routers.png"
    routers = ["switch", "hash", "task"]
    assert main([*args, "--routers", *routers, "--out", str(tmp_path), "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert plot.read_bytes().startswith(b"\x89PNG")
    assert "| switch | 1 | " in out and "| hash | 1 | " in out
    assert f"- not run: task: {NOT_FOR_LM['task']}" in out
    assert (tmp_path / "switch" / "routing.jsonl").exists()


def test_router_config_changes_only_the_router_and_the_budget():
    base = get_recipe("lm-moe-test")
    cfg = router_config(base, "gshard", None, 40)
    assert cfg.model.moe.router == "gshard" and cfg.model.moe.experts_per_token == 2
    assert cfg.train.steps == 40 and cfg.train.log_every == 2
    assert cfg.model.moe.num_experts == base.model.moe.num_experts
    assert cfg.data == base.data and cfg.optim == base.optim


def test_routing_summary_averages_the_last_quarter_of_logged_steps(tmp_path):
    rows = [
        {"step": s, "load_cv": s / 10, "dropped_fraction": 0.0, "entropy": 1.0 + s}
        for s in (10, 20, 80, 100)
    ]
    (tmp_path / "routing.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    got = routing_summary(tmp_path, 100)
    assert got == pytest.approx({"load_cv": 9.0, "dropped_fraction": 0.0, "entropy": 91.0})


def test_unknown_router_is_refused(capsys):
    with pytest.raises(SystemExit) as err:
        main(["--routers", "switch", "moe-magic"])
    assert err.value.code == 2
    assert "--routers moe-magic: not in ms.ROUTERS or VARIANTS" in capsys.readouterr().err


def test_variants_run_topk_with_their_options():
    cfg = router_config(get_recipe("lm-moe-tiny"), "topk-auxfree", None, 40)
    assert cfg.model.moe.router == "topk" and cfg.model.moe.aux_loss_weight == 0
    assert cfg.model.moe.router_options == {"score_func": "sigmoid", "balance_rate": 0.001}
    assert cfg.recipe == "lm-moe-tiny+topk-auxfree"
    grouped = router_config(get_recipe("lm-moe-tiny"), "topk-grouped", None, 40)
    assert grouped.model.moe.router_options == {"n_groups": 8, "topk_groups": 2}


def test_a_variant_named_on_a_model_it_does_not_fit_is_refused(tmp_path, capsys):
    # lm-moe-test has 4 experts: 8 groups cannot divide them
    args = ["--recipe", "lm-moe-test", "--steps", "2", "--set", "train.threads=1"]
    with pytest.raises(SystemExit) as err:  # (run with every router, it is listed as not run)
        main([*args, "--routers", "topk-grouped", "--out", str(tmp_path)])
    assert err.value.code == 2 and "n_groups=8 must divide" in capsys.readouterr().err
