"""``moesaic retgen train|ask|eval``: question answering grounded in the Python docs (RetGen).

``train`` builds the BM25 index of the python3.11-doc passages under the run directory and
trains the generator and the retriever jointly through the one trainer (progress bar,
checkpoints, ``--resume``). ``ask`` answers a question from a run, showing the passages it read
and their final posterior weights. ``eval`` scores the run's held-out test questions three ways
with the same language model: mixed over the retrieved passages, without retrieval, and with the
passages concatenated into one prompt; it writes ``eval.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path

from moesaic.cli.common import add_run_arguments, friendly_errors, saved_config
from moesaic.train.checkpoint import write_atomic
from moesaic.train.config import (
    ConfigError,
    RunConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
)
from moesaic.train.trainer import Trainer

__all__ = ["main", "train_config", "eval_table", "EVAL_FILE"]

EVAL_FILE = "eval.json"
# How each evaluated mode is named in the table.
MODE_NAMES = {
    "mixture": "grounded mixture over {k} passages",
    "none": "same LM, no retrieval",
    "concat": "same LM, {k} passages concatenated",
}


@friendly_errors("moesaic retgen")
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="moesaic retgen", description=__doc__.splitlines()[0].split(": ", 1)[1]
    )
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    train = sub.add_parser("train", help="build the index and train generator and retriever")
    train.add_argument(
        "--init", type=Path, default=None, help="a language-model run to start the generator from"
    )
    add_run_arguments(train, "the retgen run", "retgen.k=8")
    ask = sub.add_parser("ask", help="answer a question with a trained run")
    ask.add_argument("--run", type=Path, required=True, help="the retgen run directory")
    ask.add_argument("question", help='the question, e.g. "What does json.dumps do?"')
    ask.add_argument("--mode", choices=("mixture", "concat", "none"), default="mixture")
    ask.add_argument("--max-tokens", type=int, default=None, help="answer length cap (tokens)")
    ev = sub.add_parser("eval", help="held-out test questions with and without retrieval")
    ev.add_argument("--run", type=Path, required=True, help="the retgen run directory")
    ev.add_argument("--questions", type=int, default=0, help="the first N test questions (0: all)")
    ev.add_argument("--batch-size", type=int, default=16, help="questions per forward")
    args = parser.parse_args(argv)
    return {"train": _train, "ask": _ask, "eval": _eval}[args.action](args)


def train_config(overrides: list[str], init: Path | None = None) -> RunConfig:
    """``retgen_defaults()`` then ``overrides``; with ``init`` the generator is that run's model
    (its context grown to what the retgen caps need, which rotary positions allow) and starts
    from its weights."""
    from moesaic.data import tokenizer_from_json
    from moesaic.train.data import TOKENIZER_FILE
    from moesaic.train.retgen import required_length, retgen_defaults
    from moesaic.train.run import read_run_config

    data = config_to_dict(retgen_defaults())
    if init is not None:
        try:
            pretrained = read_run_config(init)
            tokenizer = tokenizer_from_json((init / TOKENIZER_FILE).read_text())
        except FileNotFoundError as err:
            raise ConfigError(f"--init {init}: {err}") from None
        data["model"] = pretrained["model"]
        data["data"]["tokenizer"] = pretrained.get("data", {}).get("tokenizer", "byte")
        data["retgen"]["init"] = str(init)
        cfg = apply_overrides(config_from_dict(RunConfig, _fit_seq_len(data)), overrides)
        needed = required_length(cfg.retgen, tokenizer)
        if cfg.model.positions == "rope" and cfg.model.max_seq_len < needed:
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, max_seq_len=needed))
        return cfg
    return apply_overrides(config_from_dict(RunConfig, data), overrides)


def _fit_seq_len(data: dict) -> dict:
    """``data`` with ``data.seq_len`` within the model's context (a retgen run does not read
    it, but every run config checks it)."""
    context = int(data["model"].get("max_seq_len", 256))
    data["data"]["seq_len"] = min(int(data["data"]["seq_len"]), context)
    return data


def _train(args: argparse.Namespace) -> int:
    if args.resume:
        if args.out is None:
            raise ConfigError("--resume needs --out DIR (the retgen run to continue)")
        cfg = saved_config(args.out, list(args.overrides))
    else:
        cfg = train_config(list(args.overrides), args.init)
    if cfg.retgen is None:
        raise ConfigError(f"{args.out} is not a retgen run (its config has no retgen section)")
    out = args.out or Path("runs") / f"{cfg.recipe}-{time.strftime('%Y%m%d-%H%M%S')}"
    print(f"run directory: {out}")
    trainer = Trainer(cfg, out, resume=args.resume, progress=not args.no_progress)
    result = trainer.fit()
    last = result.evals[-1] if result.evals else {}
    lines = [
        f"steps: {result.steps}   wall-clock: {result.wall_s:.0f} s",
        f"validation: {last.get('val_loss', float('nan')):.4f} nats per answer token"
        + (f", recall@{cfg.retgen.k} {last['val_recall']:.3f}" if "val_recall" in last else ""),
        f"training speed: {result.tokens_per_s:,.1f} questions/s",
        f'next: moesaic retgen ask --run {out} "What does json.dumps do?"',
        f"      moesaic retgen eval --run {out}",
    ]
    print("\n".join(lines), flush=True)
    return 0


def _positive(flag: str, value: int | None, zero_ok: bool = False) -> None:
    if value is not None and (value < 0 or (value == 0 and not zero_ok)):
        bound = ">= 0" if zero_ok else ">= 1"
        raise ConfigError(f"{flag}={value} must be {bound}")


def _ask(args: argparse.Namespace) -> int:
    from moesaic.train.retgen import load_retgen

    _positive("--max-tokens", args.max_tokens)
    if not args.question.strip():
        raise ConfigError('the question is empty: ask e.g. "What does json.dumps do?"')
    run = load_retgen(args.run)
    gen = run.model.generate([args.question], args.max_tokens, mode=args.mode)[0]
    print(f"answer: {gen.text}")
    if args.mode == "none":
        return 0
    index = run.model.retriever.index
    mixed = args.mode == "mixture"  # concatenated passages share one prompt and no weights
    what = "prior -> posterior after the answer" if mixed else "concatenated in this order"
    print(f"\npassages ({what}):")
    for rank, pid in enumerate(gen.passage_ids):
        p = index.passages[pid]
        weights = f"{gen.prior[rank]:.3f} -> {gen.posterior[rank]:.3f}  " if mixed else ""
        head = " ".join(p.text.split())[:90]
        print(f"{rank + 1}. [{pid}] {weights}{p.source} | {p.section}\n   {head}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from moesaic.train.retgen import answer_metrics, load_retgen

    _positive("--questions", args.questions, zero_ok=True)
    _positive("--batch-size", args.batch_size)
    run = load_retgen(args.run)
    pairs = run.splits["test"][: args.questions or None]
    if not pairs:
        raise ConfigError(f"{args.run} holds no test questions (retgen.test_questions)")
    results = {}
    for mode in ("mixture", "none", "concat"):
        results[mode] = answer_metrics(run.model, pairs, mode, batch_size=args.batch_size)
    record = {
        "step": run.step,
        "trained_mode": run.cfg.retgen.mode,
        "k": run.cfg.retgen.k,
        "results": results,
    }
    write_atomic(Path(args.run) / EVAL_FILE, json.dumps(record, indent=1))
    print(eval_table(record))
    return 0


def eval_table(record: dict) -> str:
    """The Markdown table of an ``eval.json`` record: one row per mode."""
    k, rows = record["k"], []
    for mode, m in record["results"].items():
        recall = f"{m['recall']:.3f}" if "recall" in m else "-"
        name = MODE_NAMES[mode].format(k=k)
        rows.append(f"| {name} | {m['nats_per_token']:.4f} | {m['exact_match']:.3f} | {recall} |")
    kinds = sorted({kind for m in record["results"].values() for kind in m.get("by_kind", {})})
    if kinds:
        rows += ["", f"| by question kind (nats/token, exact match) | {' | '.join(kinds)} |"]
        rows.append("|---|" + "---:|" * len(kinds))
        for mode, m in record["results"].items():
            cells = [m["by_kind"].get(kind) for kind in kinds]
            text = [
                f"{c['nats_per_token']:.4f}, {c['exact_match']:.3f}" if c else "-" for c in cells
            ]
            rows.append(f"| {MODE_NAMES[mode].format(k=k)} | {' | '.join(text)} |")
    n = next(iter(record["results"].values()))["questions"]
    head = [
        f"test questions: {n}, checkpoint step {record['step']}, trained as "
        f"{record['trained_mode']!r}",
        "",
        f"| model | answer nats/token | exact match | recall@{k} |",
        "|---|---:|---:|---:|",
    ]
    return "\n".join(head + rows)
