"""Retrieval-grounded answers on the Python docs (docs/retgen.md): RetGen's mixture over
retrieved passages against the same generator without retrieval and with the passages
concatenated into one prompt, trained at equal steps on the same questions.

Four runs of ``moesaic retgen train``'s config (``retgen_defaults``), one per row:

- RetGen: the mixture over the k passages, retriever and generator trained jointly;
- the mixture with the retriever fixed (BM25's ranking, ``retgen.joint=false``);
- the k passages concatenated into one prompt (``retgen.mode=concat``);
- no retrieval: the question alone (``retgen.mode=none``).

Each is scored on the held-out test questions in the mode it was trained in: the answers'
negative log-likelihood per token, the exact match of greedy answers and the share of questions
whose answer passage was retrieved. A finished run is reused and an interrupted one resumed, so
a stopped benchmark continues where it was.

    python benchmarks/retgen.py --out runs/retgen-bench --threads 2
    python benchmarks/retgen.py --quick --out /tmp/retgen-quick   # seconds: that it runs

Needs python3.11-doc (``moesaic data install``) and the ``retgen`` extra.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from moesaic.cli.retgen import train_config  # noqa: E402
from moesaic.cli.timing import environment  # noqa: E402
from moesaic.train.checkpoint import list_checkpoints  # noqa: E402
from moesaic.train.retgen import answer_metrics, load_retgen  # noqa: E402
from moesaic.train.trainer import Trainer  # noqa: E402

# run directory -> (row name, --set overrides)
RUNS = {
    "mixture-joint": ("RetGen: mixture, joint retriever", ["retgen.mode=mixture"]),
    "mixture-fixed": (
        "mixture, fixed BM25 retriever",
        ["retgen.mode=mixture", "retgen.joint=false"],
    ),
    "concat": ("k passages concatenated", ["retgen.mode=concat"]),
    "none": ("no retrieval", ["retgen.mode=none"]),
}
QUICK = [
    "retgen.sources=library/json,library/math,library/string",
    "retgen.k=2",
    "retgen.candidates=4",
    "retgen.passage_bytes=160",
    "retgen.doc_tokens=160",
    "retgen.question_tokens=48",
    "retgen.answer_tokens=48",
    "retgen.train_questions=64",
    "retgen.val_questions=8",
    "retgen.test_questions=8",
    "data.batch_size=4",
    "data.eval_batches=2",
    "optim.warmup_steps=2",
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/retgen-bench"))
    p.add_argument("--steps", type=int, default=None, help="training steps (default 600)")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: torch's)")
    p.add_argument("--init", type=Path, default=None, help="an LM run to start generators from")
    p.add_argument("--quick", action="store_true", help="tiny data and a few steps")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = args.steps or (12 if args.quick else 600)
    common = [f"train.steps={steps}", f"train.threads={args.threads}"]
    if args.quick:
        common += QUICK + [f"train.eval_every={steps}", f"train.checkpoint_every={steps}"]
    results = {}
    for name, (label, overrides) in RUNS.items():
        cfg = train_config([*common, *overrides], args.init)
        results[name] = {"label": label, **run(cfg, args.out / name)}
    record = {"environment": environment(), "steps": steps, "config": _shapes(cfg), "runs": results}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(record, indent=1))
    print(table(record))
    return 0


def run(cfg, run_dir: Path) -> dict:
    """Train ``cfg`` in ``run_dir`` (reusing or resuming what is there), then score its test
    questions in its own mode."""
    started = bool(list_checkpoints(run_dir / "checkpoints"))
    trainer = Trainer(cfg, run_dir, resume=started, progress=sys.stderr.isatty())
    result = trainer.fit() if trainer.step < cfg.train.steps else None
    train_s = trainer.train_s
    trainer.close()
    loaded = load_retgen(run_dir)
    start = time.perf_counter()
    metrics = answer_metrics(loaded.model, loaded.splits["test"], cfg.retgen.mode)
    return {
        "mode": cfg.retgen.mode,
        "train_s": train_s,
        "eval_s": time.perf_counter() - start,
        "val_loss": (result.val_loss if result else loaded_val_loss(run_dir)),
        **metrics,
    }


def loaded_val_loss(run_dir: Path) -> float:
    """The last validation loss a finished run logged."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["val_loss"] for r in rows if "val_loss" in r][-1]


def _shapes(cfg) -> dict:
    r, m = cfg.retgen, cfg.model
    return {
        "k": r.k,
        "candidates": r.candidates,
        "sources": r.sources,
        "batch_size": cfg.data.batch_size,
        "doc_tokens": r.doc_tokens,
        "answer_tokens": r.answer_tokens,
        "model": f"d_model={m.d_model} layers={m.n_layers} "
        f"experts={m.moe.num_experts if m.moe else 0}",
    }


def table(record: dict) -> str:
    runs = record["runs"]
    base = runs["none"]["nats_per_token"]
    k = record["config"]["k"]
    n = runs["none"]["questions"]
    lines = [
        record["environment"],
        f"steps {record['steps']}, {n} test questions, config {record['config']}",
        "",
        f"| run | test nats/token | vs no retrieval | exact match | recall@{k} | training s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in runs.values():
        recall = f"{r['recall']:.3f}" if "recall" in r else "-"
        lines.append(
            f"| {r['label']} | {r['nats_per_token']:.4f} | {r['nats_per_token'] / base:.3f} | "
            f"{r['exact_match']:.3f} | {recall} | {r['train_s']:.0f} |"
        )
    kinds = sorted({kind for r in runs.values() for kind in r["by_kind"]})
    lines += ["", "By question kind (test nats/token, exact match):", ""]
    lines += [f"| run | {' | '.join(kinds)} |", "|---|" + "---:|" * len(kinds)]
    for r in runs.values():
        cells = []
        for kind in kinds:
            m = r["by_kind"].get(kind)
            cells.append(f"{m['nats_per_token']:.4f}, {m['exact_match']:.3f}" if m else "-")
        lines.append(f"| {r['label']} | {' | '.join(cells)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
