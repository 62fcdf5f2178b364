"""Shared global workspace vs pairwise self-attention (Goyal et al. 2022, §2) on a task where every
position needs a global summary: count the distinct symbols in a sequence.

The task: a sequence of n tokens over V symbols uses d of them (d uniform in 1..V, every one of
the d at least once, the rest of the positions drawn from those d); the label is d. A position
alone cannot tell d, and pooling per-position states only sums a linear function of the symbol
histogram, while d = sum_c [count_c > 0] is not linear in it: positions must exchange
information before pooling. Pairwise attention can give every position the histogram directly;
the workspace must carry it through m slots, each of which keeps only its top-k positions (per
head), so small m and k limit what it can hold. Training and test sequences come from
different generator seeds.

Rows: the top-k workspace (``mode="replace"``, the paper's TR+HSW), the soft workspace
(``top_k=None``, TR+SSW), and the pairwise-attention Transformer with the workspace model's
parameter count (``attention_baseline``: a wider FFN); then sweeps over the slots m (top-k
fixed) and over k (m fixed). Models train with ``moesaic.train.classic.fit`` (Adam, shuffled
mini-batches, seeded) and are scored by held-out accuracy.

    python benchmarks/workspace.py --threads 2 --seeds 0 1 2 --out workspace.json \\
        --plot workspace.png
    python benchmarks/workspace.py --quick          # a few seconds: tiny sizes, one seed
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # python benchmarks/<name>.py

import torch
import torch.nn.functional as F

import moesaic as ms
from moesaic.cli.timing import environment
from moesaic.models.workspace import WorkspaceConfig, WorkspaceTransformer, attention_baseline
from moesaic.train.classic import fit

__all__ = ["Setup", "FULL", "QUICK", "distinct_symbols", "main"]

SLOTS = (1, 2, 4, 8)  # the m sweep, at the setup's top_k
TOP_K = (1, 4, 16, None)  # the k sweep, at the setup's num_slots; None: soft (k = n)


@dataclasses.dataclass(frozen=True)
class Setup:
    """Task, model and training sizes of one benchmark run."""

    seq_len: int = 32  # n
    vocab: int = 8  # V symbols; labels 1..V distinct symbols (classes 0..V-1)
    n_train: int = 20000
    n_test: int = 2000
    epochs: int = 5
    batch_size: int = 64
    lr: float = 1e-3
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 128
    num_slots: int = 8
    top_k: int = 4

    def config(self, **fields) -> WorkspaceConfig:
        """The workspace model's config, with ``fields`` replaced."""
        base = WorkspaceConfig(
            vocab_size=self.vocab, num_classes=self.vocab, max_seq_len=self.seq_len,
            d_model=self.d_model, n_layers=self.n_layers, n_heads=self.n_heads, d_ff=self.d_ff,
            num_slots=self.num_slots, top_k=self.top_k,
        )  # fmt: skip
        return dataclasses.replace(base, **fields)


FULL = Setup()
QUICK = Setup(seq_len=16, n_train=256, n_test=128, epochs=1, d_model=32, n_layers=1, d_ff=64)


def distinct_symbols(n: int, seq_len: int, vocab: int, seed: int):
    """``n`` sequences (n, seq_len) of token ids and their labels (n,): the number of distinct
    symbols used, minus 1. Deterministic under ``seed``."""
    g = torch.Generator().manual_seed(seed)
    used_N = torch.randint(1, vocab + 1, (n,), generator=g)
    symbols_NV = torch.rand(n, vocab, generator=g).argsort(dim=1)  # the first d are used
    pick_NS = (torch.rand(n, seq_len, generator=g) * used_N[:, None]).long()
    first = torch.arange(seq_len)[None, :] < used_N[:, None]  # each used symbol at least once
    pick_NS = torch.where(first, torch.arange(seq_len).expand(n, -1), pick_NS)
    tokens_NS = symbols_NV.gather(1, pick_NS)
    order_NS = torch.rand(n, seq_len, generator=g).argsort(dim=1)  # scatter them over positions
    return tokens_NS.gather(1, order_NS), used_N - 1


def _loss(model: WorkspaceTransformer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y) + ms.aux_loss(model)


@torch.no_grad()
def _accuracy(model: WorkspaceTransformer, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    batches = zip(x.split(512), y.split(512))
    return sum(int((model(xb).argmax(-1) == yb).sum()) for xb, yb in batches) / len(y)


def train_and_test(cfg: WorkspaceConfig, setup: Setup, data: dict, seed: int) -> dict:
    """Train one model under ``seed``; its parameters, held-out accuracy and training time."""
    torch.manual_seed(seed)
    model = WorkspaceTransformer(cfg)
    start = time.perf_counter()
    losses = fit(
        model, _loss, data["train"], epochs=setup.epochs, batch_size=setup.batch_size,
        lr=setup.lr, seed=seed,
    )  # fmt: skip
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "accuracy": _accuracy(model, *data["test"]),
        "train_s": time.perf_counter() - start,
        "final_loss": losses[-1],
    }


def _top_ks(setup: Setup) -> list[int | None]:
    """The k sweep at this sequence length: k < n, then None (soft, k = n)."""
    return [k for k in TOP_K if k is not None and k < setup.seq_len] + [None]


def models(setup: Setup) -> dict[str, WorkspaceConfig]:
    """Every distinct model of the run, by key: "attention" and "m={m},k={k}"."""
    out = {"attention": attention_baseline(setup.config())}
    for m in SLOTS:
        out[f"m={m},k={setup.top_k}"] = setup.config(num_slots=m)
    for k in _top_ks(setup):
        out[f"m={setup.num_slots},k={k}"] = setup.config(top_k=k)
    return out


def _k_name(k: int | None, setup: Setup) -> str:
    return f"n = {setup.seq_len} (soft)" if k is None else str(k)


def _row(cells: list[str], runs: dict, seeds: list[int]) -> str:
    accs = [runs["per_seed"][s]["accuracy"] for s in seeds]
    mean = sum(accs) / len(accs)
    return "| " + " | ".join([*cells, f"{runs['params']:,}", *(f"{a:.4f}" for a in accs),
                             f"{mean:.4f}"]) + " |"  # fmt: skip


def tables(results: dict, setup: Setup, seeds: list[int]) -> list[str]:
    """The three Markdown tables: the comparison, the m sweep and the k sweep."""
    head = " | ".join(f"seed {s}" for s in seeds)
    rule = "|---" * len(seeds)  # the seed columns of the separator row
    ws, soft = f"m={setup.num_slots},k={setup.top_k}", f"m={setup.num_slots},k=None"
    first = seeds[0]
    lines = ["Workspace vs pairwise attention (equal parameters), held-out accuracy:", "",
             f"| model | slots m | top-k | train s (seed {first}) | parameters | {head} | mean |",
             "|---" * 6 + rule + "|"]  # fmt: skip
    for name, key, m, k in (
        ("workspace, top-k (TR+HSW)", ws, setup.num_slots, str(setup.top_k)),
        ("workspace, soft (TR+SSW)", soft, setup.num_slots, _k_name(None, setup)),
        ("pairwise attention (TR)", "attention", "-", "-"),
    ):
        t = f"{results[key]['per_seed'][first]['train_s']:.1f}"
        lines.append(_row([name, str(m), k, t], results[key], seeds))
    lines += ["", f"Slots m (top-k = {setup.top_k}):", "",
              f"| slots m | parameters | {head} | mean |", "|---" * 3 + rule + "|"]  # fmt: skip
    lines += [_row([str(m)], results[f"m={m},k={setup.top_k}"], seeds) for m in SLOTS]
    lines += ["", f"Top-k (m = {setup.num_slots} slots):", "",
              f"| top-k | parameters | {head} | mean |", "|---" * 3 + rule + "|"]  # fmt: skip
    lines += [
        _row([_k_name(k, setup)], results[f"m={setup.num_slots},k={k}"], seeds)
        for k in _top_ks(setup)
    ]
    return lines


def _plot(path: Path, results: dict, setup: Setup, seeds: list[int]) -> None:
    from moesaic.metrics.plots import require_matplotlib

    plt = require_matplotlib()

    def mean(key: str) -> float:
        return sum(results[key]["per_seed"][s]["accuracy"] for s in seeds) / len(seeds)

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    sweeps = (
        (left, [str(m) for m in SLOTS], [f"m={m},k={setup.top_k}" for m in SLOTS],
         f"slots m (top-k = {setup.top_k})"),
        (right, [_k_name(k, setup) for k in _top_ks(setup)],
         [f"m={setup.num_slots},k={k}" for k in _top_ks(setup)],
         f"top-k (m = {setup.num_slots})"),
    )  # fmt: skip
    for ax, labels, keys, title in sweeps:
        ax.plot(labels, [mean(k) for k in keys], "o-", label="workspace")
        ax.axhline(mean("attention"), color="grey", ls="--", label="pairwise attention")
        ax.axhline(1 / setup.vocab, color="grey", ls=":", label="chance")
        ax.set_xlabel(title)
        ax.grid(alpha=0.3)
    left.set_ylabel(f"held-out accuracy (mean of {len(seeds)} seeds)")
    left.legend()
    fig.suptitle(f"Distinct symbols among n = {setup.seq_len} tokens (V = {setup.vocab})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds (tests)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--epochs", type=int, help="override the setup's epochs")
    p.add_argument("--vocab", type=int, help="override V, the symbols (and classes)")
    p.add_argument("--seq-len", type=int, help="override n, the sequence length")
    p.add_argument("--out", type=Path, help="write every result as JSON here")
    p.add_argument("--plot", type=Path, metavar="PNG", help="draw both sweeps here")
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error(f"--threads {args.threads}: must be >= 1")
    if args.plot is not None:
        try:
            from moesaic.metrics.plots import require_matplotlib

            require_matplotlib()
        except ImportError as err:
            p.error(f"--plot {args.plot}: {err}")
    setup = QUICK if args.quick else FULL
    for field in ("epochs", "vocab", "seq_len"):
        value = getattr(args, field)
        if value is not None:
            if value < 1:
                p.error(f"--{field.replace('_', '-')} {value}: must be >= 1")
            setup = dataclasses.replace(setup, **{field: value})
    if setup.vocab > setup.seq_len:
        p.error(f"--vocab {setup.vocab} must be <= the sequence length {setup.seq_len}")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args, setup)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, setup: Setup) -> int:
    start = time.perf_counter()
    configs = models(setup)
    results: dict = {key: {"per_seed": {}} for key in configs}
    for seed in args.seeds:
        n, V = setup.seq_len, setup.vocab
        data = {
            "train": distinct_symbols(setup.n_train, n, V, seed),
            "test": distinct_symbols(setup.n_test, n, V, 1_000_003 + seed),  # held out
        }
        for key, cfg in configs.items():
            r = train_and_test(cfg, setup, data, seed)
            results[key]["params"] = r.pop("params")
            results[key]["per_seed"][seed] = r
            print(f"seed {seed} {key}: {r['accuracy']:.4f} ({r['train_s']:.1f} s)", file=sys.stderr)
    lines = [
        f"{environment()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"total {time.perf_counter() - start:.0f} s",
        f"task: distinct symbols among n = {setup.seq_len} tokens over V = {setup.vocab} "
        f"(chance {1 / setup.vocab:.4f}); {setup.n_train} training and {setup.n_test} held-out "
        f"sequences, {setup.epochs} epochs, batch {setup.batch_size}, Adam lr {setup.lr}",
        f"model: D = {setup.d_model}, layers {setup.n_layers} (shared), {setup.n_heads} heads, "
        f"FFN {setup.d_ff} (attention: {configs['attention'].d_ff}, equal parameters)",
        "",
        *tables(results, setup, args.seeds),
    ]
    print("\n".join(lines))
    if args.out is not None:
        record = {
            "setup": dataclasses.asdict(setup), "seeds": args.seeds, "environment": environment(),
            "results": results,
        }  # fmt: skip
        args.out.write_text(json.dumps(record, indent=1))
    if args.plot is not None:
        _plot(args.plot, results, setup, args.seeds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
