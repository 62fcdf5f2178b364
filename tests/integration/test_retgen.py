"""``moesaic retgen`` end to end on a few files of the Python docs: train writes its index and
questions into the run, ask and eval read them back, a resumed run is bit-identical to an
uninterrupted one, a language-model run can start the generator, and bad input is one line."""

from __future__ import annotations

import json

import pytest
import torch

from moesaic.cli.retgen import train_config
from moesaic.train.recipes import get_recipe
from moesaic.train.retgen import load_retgen
from moesaic.train.run import load_run
from moesaic.train.trainer import Trainer
from tests.cases import require_debian, without_timings

SMALL = [  # three doc files, two passages of 160 bytes per question: seconds per run
    "retgen.sources=library/json,library/math,library/string",
    "retgen.k=2",
    "retgen.candidates=4",
    "retgen.passage_bytes=160",
    "retgen.doc_tokens=160",
    "retgen.question_tokens=48",
    "retgen.answer_tokens=48",
    "retgen.train_questions=64",
    "retgen.val_questions=8",
    "retgen.test_questions=6",
    "data.batch_size=4",
    "data.eval_batches=2",
    "train.steps=8",
    "train.eval_every=4",
    "train.checkpoint_every=4",
    "train.log_every=1",
    "optim.warmup_steps=2",
]


@pytest.fixture(autouse=True)
def _docs_installed():
    require_debian("python3.11-doc")


def _sets(overrides):
    return [a for s in overrides for a in ("--set", s)]


def test_train_then_ask_and_eval(tmp_path, cli):
    out = tmp_path / "run"
    code, stdout, stderr = cli("retgen", "train", "--out", str(out), "--no-progress", *_sets(SMALL))
    assert code == 0, stderr
    assert "nats per answer token" in stdout and "recall@2" in stdout
    assert {"index", "qa.json", "tokenizer.json", "checkpoints"} <= {p.name for p in out.iterdir()}
    code, stdout, stderr = cli(
        "retgen", "ask", "--run", str(out), "What does json.dumps do?", "--max-tokens", "8"
    )
    assert code == 0, stderr
    assert stdout.startswith("answer: ") and "1. [" in stdout and "2. [" in stdout
    assert " -> " in stdout and "library/json.rst.txt" in stdout
    code, stdout, stderr = cli("retgen", "eval", "--run", str(out))
    assert code == 0, stderr
    record = json.loads((out / "eval.json").read_text())
    assert record["step"] == 8 and set(record["results"]) == {"mixture", "none", "concat"}
    for mode, metrics in record["results"].items():
        assert metrics["questions"] == 6 and metrics["nats_per_token"] > 0
        assert 0 <= metrics["exact_match"] <= 1 and ("recall" in metrics) == (mode != "none")
    assert "| grounded mixture over 2 passages |" in stdout
    assert (
        "| same LM, no retrieval |" in stdout and "| same LM, 2 passages concatenated |" in stdout
    )


def test_a_retgen_run_resumes_bit_identically(tmp_path):
    cfg = train_config(SMALL)
    full = Trainer(cfg, tmp_path / "full", progress=False)
    full.fit()
    part = Trainer(cfg, tmp_path / "part", progress=False)
    part.fit(max_steps=4)
    resumed = Trainer(cfg, tmp_path / "part", progress=False, resume=True)
    assert resumed.step == 4
    resumed.fit()
    assert without_timings(tmp_path / "part") == without_timings(tmp_path / "full")
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    # joint training moved the retriever's learned term away from zero
    assert full.model.retriever.bilinear.abs().sum() > 0
    assert "val_recall" in full.evals[-1] and full.evals[-1]["val_loss"] > 0
    loaded = load_retgen(tmp_path / "full")
    for (name, a), b in zip(full.model.state_dict().items(), loaded.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_the_generator_can_start_from_a_language_model_run(tmp_path):
    lm_run = tmp_path / "lm"
    Trainer(get_recipe("lm-moe-test"), lm_run, progress=False).fit(max_steps=2)
    cfg = train_config([*SMALL, "train.steps=2"], init=lm_run)
    assert cfg.model.max_seq_len > 32 and cfg.model.d_model == 32  # its context grew
    trainer = Trainer(cfg, tmp_path / "grounded", progress=False)
    lm = load_run(lm_run).model.state_dict()
    for name, value in trainer.model.lm.state_dict().items():
        assert torch.equal(value, lm[name]), name
    trainer.fit()


def test_bad_input_is_one_line(tmp_path, cli):
    cases = [
        (["train", "--set", "retgen.k=0"], "retgen.k=0 must be >= 1"),
        (["train", "--set", "retgen.mode=rag"], "retgen.mode='rag' is not one of"),
        (["train", "--set", "retgen.candidates=2"], "retgen.candidates=2 must be >= retgen.k=4"),
        (["train", "--set", "retgen.kinds=why"], "retgen.kinds='why' must be a comma-separated"),
        (
            [
                "train",
                "--out",
                str(tmp_path / "short"),
                *_sets([SMALL[0], "model.max_seq_len=300"]),
            ],
            "model.max_seq_len=300 must be >= 1720: retgen.k=4 passages",
        ),
        (
            ["train", "--out", str(tmp_path / "none"), "--set", "retgen.sources=library/zzz"],
            "retgen.sources='library/zzz'",
        ),
        (["ask", "--run", str(tmp_path / "nowhere"), "q"], "is not a run directory"),
        (["eval", "--run", str(tmp_path), "--questions", "-1"], "--questions=-1 must be >= 0"),
        (["train", "--resume"], "--resume needs --out DIR"),
    ]
    for args, message in cases:
        code, _, stderr = cli("retgen", *args)
        assert code == 2, (args, stderr)
        assert message in stderr and stderr.strip().count("\n") == 0, (args, stderr)
