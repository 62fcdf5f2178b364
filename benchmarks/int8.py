"""int8 weight-only experts (``ms.inference.quantize``) on a trained run: size, decoding speed
and validation-loss change.

Three copies of the run's model, timed interleaved in this one process: float experts (the
default "auto" backend), int8 experts through ``torch._weight_int8pack_mm`` (when this torch has
it) and int8 experts dequantised per call. Columns: expert MiB (weights the experts hold), val
loss on the run's fixed validation windows, decoding tokens/s at batch 1 and 32 (greedy, KV
cache, 16-token prompts, 48 new tokens).

    python benchmarks/int8.py --run runs/lm-tokenmoe        # any token-routed LM run
    python benchmarks/int8.py --kernel                      # the product alone, by rows
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # python benchmarks/<name>.py

import torch

import moesaic as ms
from benchmarks.harness import environment, time_interleaved
from benchmarks.taskmoe import NEW, decode, stream_prompt
from moesaic.data import TokenStream, eval_batches, load_corpus, split_documents
from moesaic.inference.quantize import QuantizedExperts, int8_kernel_available
from moesaic.train.run import load_run
from moesaic.train.trainer import evaluate


def expert_bytes(model: torch.nn.Module) -> int:
    total = 0
    for layer in (m for m in model.modules() if isinstance(m, ms.MoE)):
        if isinstance(layer.experts, QuantizedExperts):
            total += layer.experts.nbytes()
        else:
            total += sum(p.numel() * p.element_size() for p in layer.experts.parameters())
    return total


def kernel_table(rounds: int) -> None:
    """x (M, 512) times one (2048, 512) weight: fp32 ``F.linear`` vs the int8 kernel."""
    w = torch.randn(2048, 512)
    q, s = ms.inference.quantize_rows(w)
    print("| rows M | fp32 F.linear ms | int8 kernel ms | int8 / fp32 |")
    print("|---:|---:|---:|---:|")
    for m in (1, 8, 32, 64):
        x = torch.randn(m, 512)
        calls = {
            "fp32": lambda x=x: torch.nn.functional.linear(x, w),
            "int8": lambda x=x: torch._weight_int8pack_mm(x, q, s),
        }
        t = time_interleaved(calls, rounds)
        print(
            f"| {m} | {t['fp32'] * 1e3:.3f} | {t['int8'] * 1e3:.3f} | {t['int8'] / t['fp32']:.1f} |"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=None, help="a trained run directory")
    parser.add_argument("--kernel", action="store_true", help="time the product alone")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.threads < 1:
        parser.error("--rounds and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    if args.kernel:
        if not int8_kernel_available():
            parser.error("torch._weight_int8pack_mm is not available in this torch")
        print(environment())
        kernel_table(args.rounds)
        return 0
    if args.run is None:
        parser.error("--run DIR is required (or --kernel)")
    run = load_run(args.run)
    d = run.cfg.data
    _, val_docs = split_documents(load_corpus(d.corpus), d.val_fraction, d.seed)
    val = TokenStream.from_documents(val_docs, run.tokenizer)
    batches = eval_batches(val, d.batch_size, d.seq_len, d.eval_batches)
    models = {"float32": run.model}
    if int8_kernel_available():
        models["int8 kernel"] = copy.deepcopy(run.model)
        ms.inference.quantize(models["int8 kernel"], kernel=True)
    models["int8 dequantised"] = copy.deepcopy(run.model)
    ms.inference.quantize(models["int8 dequantised"], kernel=False)
    prompts = {b: stream_prompt(val, b) for b in (1, 32)}
    calls = {
        f"{name} b{b}": (lambda m=m, p=prompts[b]: decode(m, p, None))
        for name, m in models.items()
        for b in (1, 32)
    }
    seconds = time_interleaved(calls, args.rounds)
    print(f"# int8 weight-only experts: {args.run} (step {run.step})\n")
    print(environment())
    if "int8 kernel" not in models:
        print("torch._weight_int8pack_mm is not available here: only the dequantising path")
    print()
    print("| experts | expert MiB | val loss | change | tok/s b1 | tok/s b32 |")
    print("|---|---:|---:|---:|---:|---:|")
    base = None
    for name, m in models.items():
        loss = evaluate(m, batches)
        base = loss if base is None else base
        r1, r32 = (b * NEW / seconds[f"{name} b{b}"] for b in (1, 32))
        print(
            f"| {name} | {expert_bytes(m) / 2**20:.2f} | {loss:.4f} | {loss - base:+.5f} | "
            f"{r1:,.0f} | {r32:,.0f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
