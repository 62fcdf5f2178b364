"""TaskMoE vs token-MoE on the multi-domain corpus, and each domain's extracted sub-network.

Kudugunta et al. 2021 ("Beyond Distillation"): routing by task lets each
task's sub-network be extracted and served like a small dense model; their headline is 1.9x the
token-MoE's peak decoding throughput at equal or better quality. Here ``lm-tokenmoe`` and
``lm-taskmoe`` (same data, batches, steps, experts and activated FLOPs; the domain label is the
task) are trained by the trainer, which passes each batch's domains to the task router as
``ms.routing_context(task=...)``, as ``moesaic train`` does. One table per domain:

- val loss: next-token cross-entropy on that domain's validation documents (fixed windows);
- params: parameters the model holds (the extracted model: only that task's experts);
- tok/s b1, b32: greedy decoding with the KV cache, new tokens per second at batch 1 and 32
  (after a 16-token prompt), timed interleaved round-robin in this one process;
- x token b32: batch-32 decoding throughput over the token-MoE's.

    python benchmarks/taskmoe.py                     # 600 steps each (about 10 min on 2 cores)
    python benchmarks/taskmoe.py --steps 2 --eval-batches 1 --rounds 1   # that it runs
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # python benchmarks/<name>.py

import torch

import moesaic as ms
from benchmarks.harness import environment, time_interleaved
from moesaic.data import TokenStream, eval_batches, load_corpus, split_documents
from moesaic.models.lm import KVCache, MoELM
from moesaic.train.config import RunConfig, apply_overrides
from moesaic.train.data import prepare_data
from moesaic.train.recipes import get_recipe
from moesaic.train.trainer import Trainer

PROMPT, NEW = 16, 48  # decoding: prompt tokens, then new tokens per timed call


def train(cfg: RunConfig, data, steps: int, out: Path, threads: int) -> MoELM:
    """``cfg``'s model trained ``steps`` steps by the trainer (which passes each batch's
    domains to the task router as its task ids) into ``out / cfg.recipe``."""
    cfg = apply_overrides(
        cfg, [f"train.steps={steps}", f"train.threads={threads}", "train.sample_tokens=0"]
    )
    trainer = Trainer(cfg, out / cfg.recipe, data=data)
    trainer.fit()
    return trainer.model.eval()


@torch.no_grad()
def domain_loss(model: MoELM, batches, task: int | None) -> float:
    """Mean validation loss; ``task`` None runs the model without a routing context."""
    total = 0.0
    for b in batches:
        if task is None:
            total += model.loss(b.x, b.y).item()
        else:
            with ms.routing_context(task=task):
                total += model.loss(b.x, b.y).item()
    return total / len(batches)


@torch.inference_mode()
def decode(model: MoELM, prompt_BS: torch.Tensor, task: int | None) -> None:
    """Greedy decoding of NEW tokens after ``prompt_BS`` with the KV cache."""
    cache = KVCache(model.cfg.n_layers)
    ctx = ms.routing_context(task=task) if task is not None else _null()
    with ctx:
        nxt = model(prompt_BS, cache)[:, -1].argmax(-1, keepdim=True)
        for _ in range(NEW - 1):
            nxt = model(nxt, cache)[:, -1].argmax(-1, keepdim=True)


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600, help="training steps of each model")
    parser.add_argument("--eval-batches", type=int, default=8, help="val batches per domain")
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds per cell")
    parser.add_argument("--out", type=Path, default=None, help="keep the two runs here")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared machine, idle OpenMP threads spinning "
        "against other processes made two threads several times slower)",
    )
    args = parser.parse_args(argv)
    if min(args.steps, args.eval_batches, args.rounds, args.threads) < 1:
        parser.error("--steps, --eval-batches, --rounds and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    task_cfg, token_cfg = get_recipe("lm-taskmoe"), get_recipe("lm-tokenmoe")
    data = prepare_data(task_cfg.data)
    names = data.train.domains
    out = args.out or Path(tempfile.mkdtemp(prefix="taskmoe-"))
    started = time.perf_counter()
    token = train(token_cfg, data, args.steps, out, args.threads)
    task = train(task_cfg, data, args.steps, out, args.threads)
    train_s = time.perf_counter() - started
    _, val_docs = split_documents(
        load_corpus(task_cfg.data.corpus), task_cfg.data.val_fraction, task_cfg.data.seed
    )
    d = task_cfg.data
    print(f"# TaskMoE vs token-MoE, {args.steps} steps each ({train_s:.0f} s of training)\n")
    print(environment())
    print(f"runs in {out}; decoding: {PROMPT}-token prompt, {NEW} new tokens, greedy\n")
    summary = []
    for t, name in enumerate(names):
        stream = TokenStream.from_documents(
            [doc for doc in val_docs if doc.domain == name], data.tokenizer, domains=names
        )
        batches = eval_batches(stream, d.batch_size, d.seq_len, args.eval_batches)
        sub = ms.inference.extract(task, t)
        models = {"token-MoE": (token, t), "TaskMoE": (task, t), "extracted": (sub, None)}
        prompts = {b: stream_prompt(stream, b) for b in (1, 32)}
        calls = {
            f"{label} b{b}": (lambda m=m, c=c, p=prompts[b]: decode(m, p, c))
            for label, (m, c) in models.items()
            for b in (1, 32)
        }
        seconds = time_interleaved(calls, args.rounds)
        rows = []
        for label, (m, c) in models.items():
            loss = domain_loss(m, batches, c)
            rate = {b: b * NEW / seconds[f"{label} b{b}"] for b in (1, 32)}
            rows.append((label, loss, params(m), rate[1], rate[32]))
        base32 = rows[0][4]
        print(f"## {name}\n")
        print("| model | val loss | params | tok/s b1 | tok/s b32 | x token b32 |")
        print("|---|---:|---:|---:|---:|---:|")
        for label, loss, n, r1, r32 in rows:
            print(f"| {label} | {loss:.4f} | {n:,} | {r1:,.0f} | {r32:,.0f} | {r32 / base32:.2f} |")
        print()
        summary.append((name, rows[2][4] / base32, rows[2][1] - rows[0][1]))
    print("## Target: extracted >= 1.9x token-MoE batch-32 decoding at equal or lower loss\n")
    print("| domain | x token b32 | loss extracted - token | met |")
    print("|---|---:|---:|---|")
    for name, speed, dloss in summary:
        met = "yes" if speed >= 1.9 and dloss <= 0 else "no"
        print(f"| {name} | {speed:.2f} | {dloss:+.4f} | {met} |")
    return 0


def stream_prompt(stream: TokenStream, batch: int) -> torch.Tensor:
    """``batch`` prompts of PROMPT tokens spread over the domain's validation stream."""
    starts = torch.linspace(0, len(stream) - PROMPT - 1, batch).long().tolist()
    rows = [torch.from_numpy(stream.tokens[s : s + PROMPT].astype("int64")) for s in starts]
    return torch.stack(rows)


if __name__ == "__main__":
    raise SystemExit(main())
