"""Every command-line option with a bad value: exit status 2, no traceback, and a last stderr line
naming the option (or field) and the rule. Inference requests with empty or over-long prompts and
bad sampling values are refused the same way."""

from __future__ import annotations

import importlib

import pytest

from moesaic.train.config import apply_overrides
from moesaic.train.recipes import get_recipe
from moesaic.train.trainer import Trainer


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    cfg = apply_overrides(get_recipe("lm-moe-test"), ["train.steps=2", "train.sample_tokens=0"])
    Trainer(cfg, run_dir, progress=False).fit()
    return run_dir


# (command module, argv with RUN for the tiny run's directory, expected piece of the last line)
BAD_OPTIONS = [
    ("train", ["--recipe", "nope"], "recipe 'nope' is not one of"),
    ("train", ["--set", "train.steps=-1"], "train.steps=-1 must be >= 1"),
    ("train", ["--set", "steps"], "--set 'steps' must look like section.field=value"),
    ("train", ["--resume"], "--resume and --auto-resume need --run-dir"),
    ("train", ["--auto-resume"], "--resume and --auto-resume need --run-dir"),
    ("train", ["--resume", "--run-dir", "MISSING"], "is not a run directory"),
    # valid field by field, impossible on any machine: refused before any work by the memory bound
    ("train", ["--set", "model.moe.num_experts=100000000"], "the run needs at least"),
    ("train", ["--set", "model.d_model=1048576"], "the run needs at least"),
    ("train", ["--set", "model.n_layers=100000"], "the run needs at least"),
    ("train", ["--set", "data.batch_size=1000000000"], "the run needs at least"),
    ("train", ["--set", "data.eval_batches=1000000000"], "data.eval_batches=1000000000"),
    ("train", ["--set", "train.threads=100000"], "train.threads=100000 must be <="),
    ("compare", ["--set", "model.moe.top_k=40"], "model.moe.top_k=40 must be"),
    ("train", ["--set", "model.top_k=2"], "moved to model.moe.top_k: use --set model.moe.top_k=2"),
    ("generate", ["--run", "RUN", "--prompt", ""], "--prompt must not be empty"),
    ("generate", ["--run", "RUN", "--prompt", "x" * 40], "--prompt is 40 tokens; the model's"),
    ("generate", ["--run", "RUN", "--prompt", "a", "--max-new-tokens", "-1"], "--max-new-tokens"),
    (
        "generate",
        ["--run", "RUN", "--prompt", "ab", "--max-new-tokens", "100000"],
        "--max-new-tokens=100000 must be <= 30: the model's context is 32 tokens",
    ),
    ("train", ["--set", "model.moe=none"], "would train a dense model under the MoE recipe"),
    ("train", ["--set", "model.num_experts=0"], "model.moe=none removes the section"),
    ("generate", ["--run", "RUN", "--prompt", "a", "--temperature", "-0.5"], "--temperature"),
    ("generate", ["--run", "RUN", "--prompt", "a", "--temperature", "nan"], "--temperature=nan"),
    ("generate", ["--run", "RUN", "--prompt", "a", "--top-k", "-3"], "--top-k=-3 must be >= 0"),
    ("generate", ["--run", "RUN", "--prompt", "a", "--top-p", "0"], "--top-p=0.0 must be in (0"),
    ("generate", ["--run", "RUN", "--prompt", "a", "--top-p", "1.5"], "--top-p=1.5 must be in"),
    ("generate", ["--run", "MISSING", "--prompt", "a"], "is not a run directory"),
    ("generate", ["--run", "RUN", "--prompt", "a", "--seed", "x"], "--seed: invalid int value"),
    ("eval", ["--run", "RUN", "--batches", "0"], "--batches=0 must be >= 1"),
    ("eval", ["--run", "MISSING"], "is not a run directory"),
    ("report", ["RUN", "--devices", "0"], "devices=0"),
    ("report", ["RUN", "--pue", "0.5"], "pue=0.5"),
    ("report", ["RUN", "--device-preset", "abacus"], "--device-preset: invalid choice"),
]


def _call(command: str, argv: list[str]) -> int:
    main = importlib.import_module(f"moesaic.cli.{command}").main
    try:
        return main(argv)
    except SystemExit as exit:  # argparse's own errors
        return exit.code


@pytest.mark.parametrize(
    "command,argv,message", BAD_OPTIONS, ids=[f"{c} {' '.join(a)[:40]}" for c, a, _ in BAD_OPTIONS]
)
def test_a_bad_option_exits_2_with_a_last_line_naming_it(
    command, argv, message, run, tmp_path, capsys
):
    argv = [
        str(run) if a == "RUN" else str(tmp_path / "missing") if a == "MISSING" else a for a in argv
    ]
    assert _call(command, argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert message in err.strip().splitlines()[-1], err
