"""Expert offloading (``ms.inference.offload``): decoding speed and peak memory by budget.

A generated (untrained) MoE LM whose experts total 1 GiB by default (4 layers, 32 experts of
D=512, F=2048 each, top-2, fp32) decodes a batch of prompts greedily with the KV cache, once
with every expert resident and once per budget (100%, 50%, 25% of the expert bytes). Each run is
a fresh process: it builds the model from the same seed, offloads it (writing the store), drops
the store's pages from the page cache (``os.posix_fadvise(..., POSIX_FADV_DONTNEED)``) so the
first reads come from disk, resets the peak-RSS mark (``/proc/self/clear_refs``), then decodes.

The offloaded experts a layer needs run together in one call of the layer's own expert backend
(the tuned CPU backend for this default-backend model) when they fit in the budget, else in
groups that fit; a second resident row runs the plain "torch" expert loop, one expert at a time:
"x resident loop" compares with that, "x resident" with the tuned CPU backend (oneDNN products;
threads over experts when --threads > 1).

Columns: tok/s (new tokens per second over the decoding steps), x resident, peak RSS (VmHWM
while decoding: the process, not just the experts), resident expert MiB (most weight bytes the
resident set held), reads (experts read from the store), hit rate (experts found resident or on
their way), guess rate (experts the previous step's choices predicted for the next layer).

    python benchmarks/offload.py                       # 1 GiB of experts, batch 32, 1 thread
    python benchmarks/offload.py --d-ff 256 --steps 2  # seconds: that it runs

The store lives in a temporary folder under /tmp and is deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # python benchmarks/<name>.py

import torch

import moesaic as ms
from benchmarks.harness import environment
from moesaic.models.lm import KVCache, LMConfig, MoELM

PROMPT = 16
LABELS = {0.0: "resident", -1.0: "resident loop"}


def model_config(args: argparse.Namespace) -> LMConfig:
    return LMConfig(
        vocab_size=256,
        max_seq_len=PROMPT + args.steps + 1,
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=8,
        d_ff=args.d_ff,
        moe=ms.MoEConfig(num_experts=args.experts, top_k=2, router="topk", capacity_factor=None),
        moe_every=1,
    )


def expert_bytes(cfg: LMConfig) -> int:
    return cfg.n_layers * cfg.moe.num_experts * 2 * cfg.d_model * cfg.d_ff * 4


def _peak_rss_reset() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def _peak_rss() -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024


@torch.inference_mode()
def decode(model: MoELM, batch: int, steps: int) -> float:
    """Seconds of ``steps`` greedy decoding steps after a PROMPT-token prefill."""
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 256, (batch, PROMPT), generator=gen)
    cache = KVCache(model.cfg.n_layers)
    nxt = model(idx, cache)[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(steps):
        nxt = model(nxt, cache)[:, -1:].argmax(-1)
    return time.perf_counter() - start


def run_one(args: argparse.Namespace) -> dict:
    """One run in this process: resident (``--fraction 0``; ``-1``: resident with the plain
    "torch" expert loop the offloaded experts compute with) or offloaded to that budget."""
    torch.manual_seed(0)
    cfg = model_config(args)
    model = MoELM(cfg).eval()
    if args.fraction < 0:
        for layer in (m for m in model.modules() if isinstance(m, ms.MoE)):
            layer.experts.backend = "torch"
        args.fraction = 0
    total = expert_bytes(cfg)
    cache = None
    if args.fraction:
        cache = ms.inference.offload(
            model, budget_bytes=int(total * args.fraction), store=args.store
        )
        for path in Path(args.store).glob("*.safetensors"):
            fd = os.open(path, os.O_RDONLY)
            os.fsync(fd)  # written pages must be clean for the page cache to drop them
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
    _peak_rss_reset()
    seconds = decode(model, args.batch, args.steps)
    row = {"tok_s": args.batch * args.steps / seconds, "peak_rss": _peak_rss()}
    if cache is not None:
        s = cache.stats
        row |= {
            "resident_bytes": s.peak_bytes,
            "reads": s.reads,
            "hit_rate": s.hit_rate,
            "guess_rate": s.prefetch_rate,
        }
        cache.close()
    return row


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--d-ff", type=int, default=2048)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=16, help="decoding steps timed")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument(
        "--repeats", type=int, default=1, help="rounds over all budgets; each row the median"
    )
    parser.add_argument("--fraction", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--store", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("d_model", "d_ff", "experts", "layers", "batch", "steps", "threads", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    torch.set_num_threads(args.threads)
    if args.fraction is not None:  # a child process: one run, JSON on stdout
        print(json.dumps(run_one(args)))
        return 0
    cfg = model_config(args)
    total = expert_bytes(cfg)
    store = tempfile.mkdtemp(prefix="moesaic-offload-", dir="/tmp")
    runs: dict[float, list[dict]] = {}
    try:
        for r in range(args.repeats):  # each round runs every budget once, in the same order
            for fraction in (0.0, -1.0, 1.0, 0.5, 0.25):
                argv_child = [
                    *(argv or sys.argv[1:]),
                    *("--fraction", str(fraction), "--store", store),
                ]
                out = subprocess.run(
                    [sys.executable, __file__, *argv_child], capture_output=True, text=True
                )
                if out.returncode:
                    print(out.stderr, file=sys.stderr)
                    return out.returncode
                runs.setdefault(fraction, []).append(
                    json.loads(out.stdout.strip().splitlines()[-1])
                )
                print(f"round {r + 1}, budget {fraction:.0%}: done", file=sys.stderr)
    finally:
        shutil.rmtree(store, ignore_errors=True)
    # the median run of each budget by tok/s (the machine's load moves single runs by up to 2x)
    rows = {f: sorted(rs, key=lambda r: r["tok_s"])[len(rs) // 2] for f, rs in runs.items()}
    print(f"# Expert offloading: {total / 2**30:.2f} GiB of experts, batch {args.batch}\n")
    print(environment())
    print(
        f"model: {args.layers} MoE layers x {args.experts} experts (D={args.d_model}, "
        f"F={args.d_ff}, top-2, fp32); {args.steps} decoding steps after a {PROMPT}-token "
        f"prompt; each row the median of {args.repeats} run(s), tok/s of every run: "
        + "; ".join(
            f"{LABELS.get(f, f'{f:.0%}')}: " + ", ".join(f"{r['tok_s']:,.0f}" for r in rs)
            for f, rs in runs.items()
        )
        + "\n"
    )
    print(
        "| budget | tok/s | x resident | x resident loop | peak RSS MiB | resident expert MiB | "
        "reads | hit rate | guess rate |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    base, loop = rows[0.0]["tok_s"], rows[-1.0]["tok_s"]
    names = {0.0: "resident (tuned CPU backend)", -1.0: "resident (plain torch loop)"}
    for fraction, r in rows.items():
        name = names.get(fraction, f"{fraction:.0%}")
        extra = (
            f"{r['resident_bytes'] / 2**20:,.0f} | {r['reads']:,} | {r['hit_rate']:.2f} | "
            f"{r['guess_rate']:.2f}"
            if fraction > 0
            else f"{total / 2**20:,.0f} | - | - | -"
        )
        print(
            f"| {name} | {r['tok_s']:,.0f} | {r['tok_s'] / base:.2f} | {r['tok_s'] / loop:.2f} | "
            f"{r['peak_rss'] / 2**20:,.0f} | {extra} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
