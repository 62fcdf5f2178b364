"""The LSTM-MoE through the one trainer: ``moesaic train --recipe lstm-moe-test`` trains it and
samples text, a run resumes bit for bit, and ``moesaic eval`` and ``moesaic report`` rebuild
its model."""

from __future__ import annotations

import pytest
import torch

from moesaic.metrics import count
from moesaic.models.lstm import LSTMMoE
from moesaic.train.config import ConfigError, apply_overrides
from moesaic.train.recipes import get_recipe
from moesaic.train.run import load_run
from moesaic.train.trainer import Trainer
from tests.cases import metric_rows, without_timings

ONE_THREAD = "train.threads=1"  # these widths gain nothing from a second thread


@pytest.fixture
def trained(tmp_path, cli):
    run = tmp_path / "run"
    code, stdout, stderr = cli(
        "train", "--recipe", "lstm-moe-test", "--run-dir", str(run), "--no-progress",
        "--set", ONE_THREAD,
    )  # fmt: skip
    assert code == 0, stderr
    return run, stdout


def test_the_test_recipe_trains_the_lstm_moe_and_samples_text(trained):
    run, stdout = trained
    evals = [r for r in metric_rows(run) if "val_loss" in r]
    assert [r["step"] for r in evals] == [10, 20, 30]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert "sample:\ndef " in stdout
    loaded = load_run(run)
    assert isinstance(loaded.model, LSTMMoE) and loaded.step == 30
    assert len(loaded.model.moe_layers()) == 1


def test_eval_and_report_rebuild_the_lstm_run(trained, cli):
    run, _ = trained
    final = [r for r in metric_rows(run) if "val_loss" in r][-1]["val_loss"]
    code, stdout, stderr = cli("eval", "--run", str(run))
    assert code == 0, stderr
    assert f"step 30: validation loss {final:.4f} nats/token" in stdout
    code, stdout, stderr = cli("report", str(run))
    assert code == 0, stderr
    fwd = count(load_run(run).model).forward_flops
    assert "| run | lstm-moe-test | " in stdout and "| run | ffns.0 | 30 |" in stdout
    assert (run / "report.html").exists()
    from moesaic.metrics.report import summarize_run

    assert summarize_run(run).count.forward_flops == fwd


def test_generate_samples_an_lstm_run_prompt_by_prompt(trained, cli):
    from moesaic.inference.generate import generate_ids

    run, _ = trained
    code, stdout, stderr = cli("generate", "--run", str(run), "--prompt", "def ", "--prompt",
                               "class ", "--max-new-tokens", "12", "--seed", "3")  # fmt: skip
    assert code == 0, stderr
    loaded = load_run(run)
    prompt = list(loaded.tokenizer.encode("class "))
    second = generate_ids(loaded.model, prompt, 12, temperature=0.8, top_k=40, seed=4,
                          use_cache=False)  # fmt: skip
    assert stdout.startswith("def ") and ("class " + loaded.tokenizer.decode(second)) in stdout
    assert "12 new tokens" not in stderr and "24 new tokens in 2 sequences" in stderr


def test_an_lstm_run_resumes_bit_identically(tmp_path):
    # dropout and the router's noise both draw from the RNG a checkpoint must restore
    cfg = apply_overrides(get_recipe("lstm-moe-test"), ["lstm.dropout=0.1", ONE_THREAD])
    threads = torch.get_num_threads()
    try:
        full = Trainer(cfg, tmp_path / "full", progress=False)
        full.fit()
        part = Trainer(cfg, tmp_path / "part", progress=False)
        part.fit(max_steps=10)
        resumed = Trainer(cfg, tmp_path / "part", progress=False, resume=True)
        assert resumed.step == 10
        resumed.fit()
    finally:
        torch.set_num_threads(threads)
    assert without_timings(tmp_path / "part") == without_timings(tmp_path / "full")
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["finetune.task=fortune"], "lstm: an LSTM language-model run takes no finetune section"),
        (["parallel.expert=2"], "parallel.expert=2: LSTM runs train on one process"),
    ],
)
def test_an_lstm_run_refuses_other_tasks_and_expert_parallelism(overrides, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(get_recipe("lstm-moe-test"), overrides)
