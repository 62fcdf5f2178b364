"""int8 experts (``ms.inference.quantize``) on a trained run: size, decoding speed and
validation-loss change, one row per int8 kernel (moesaic/inference/int8.py).

Copies of the run's model, timed interleaved in this one process: float experts (the default
"auto" backend), then int8 experts on each kernel this CPU and torch can run ("dynamic":
integer products through torch's dynamic quantised linear; "int8pack": weight-only
``torch._weight_int8pack_mm``; "dequantise": the reference). Columns: expert MiB (weights the
experts hold), val loss on the run's fixed validation windows, decoding tokens/s at batch 1 and
32 (greedy, KV cache, 16-token prompts, 48 new tokens; medians over the rounds) and the ratio to
float32 (the median over rounds of the two times in the same round). "only_faster" on experts
where the rule keeps fp32 is float32 itself: its ratio shows the noise of the measurement.

    python benchmarks/int8.py --run runs/lm-tokenmoe        # any token-routed LM run
    python benchmarks/int8.py --generated 512x2048          # untrained, larger experts
    python benchmarks/int8.py --kernel                      # the products alone, by rows

Rows: float32; int8 by the default rule (the kernel it picks for these experts); the rule with
``only_faster`` (layers where int8 loses stay fp32); then each kernel forced.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # python benchmarks/<name>.py

import torch

import moesaic as ms
from benchmarks.harness import environment, time_interleaved, time_rounds
from benchmarks.taskmoe import NEW, PROMPT, decode, stream_prompt
from moesaic.data import TokenStream, eval_batches, load_corpus, split_documents
from moesaic.inference.int8 import has_vnni
from moesaic.inference.quantize import (
    QuantizedExperts,
    int8_kernel,
    int8_kernel_available,
    named_kernel,
)
from moesaic.models.lm import LMConfig, MoELM
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


def kernels() -> list[str]:
    """The int8 kernels this CPU and torch can run, the default first."""
    names = [int8_kernel().name]
    names += [k for k in ("dynamic", "int8pack", "dequantise") if k not in names]
    if not int8_kernel_available():
        names.remove("int8pack")
    if int8_kernel().name != "dynamic":
        names = [k for k in names if k != "dynamic"]
    return names


def cpu_line() -> str:
    """The CPU's model name (/proc/cpuinfo where there is one), its AVX-512 and VNNI, and the
    default int8 kernel: every figure is printed beside it."""
    name = platform.processor() or "unknown CPU"
    info = Path("/proc/cpuinfo")
    if info.exists():
        models = [
            ln.split(":", 1)[1].strip()
            for ln in info.read_text().splitlines()
            if ln.startswith("model name")
        ]
        name = models[0] if models else name
    caps = torch.cpu.get_capabilities()
    avx512 = "yes" if caps.get("avx512_f") else "no"
    vnni = "yes" if has_vnni(caps) else "no"
    return (
        f"CPU: {name}, AVX-512 {avx512}, VNNI {vnni}; default int8 kernel: "
        f"{int8_kernel().describe()}"
    )


def kernel_table(rounds: int, shapes: Sequence[tuple[int, int]]) -> None:
    """x (M, K) times one (N, K) weight: fp32 ``F.linear`` vs each int8 kernel."""
    names = kernels()
    print(
        "| N x K | rows M | fp32 F.linear ms | "
        + " | ".join(f"{k} ms" for k in names)
        + " | "
        + " | ".join(f"fp32 / {k}" for k in names)
        + " |"
    )
    print("|---|---:|---:|" + "---:|" * (2 * len(names)))
    for n, k in shapes:
        w = torch.randn(n, k)
        q, s = ms.inference.quantize_rows(w)
        packed = {name: named_kernel(name).pack(q, s, None) for name in names}
        for m in (1, 8, 32, 64, 256):
            x = torch.randn(m, k)
            calls = {"fp32": lambda x=x, w=w: torch.nn.functional.linear(x, w)}
            for name in names:
                kern, p = named_kernel(name), packed[name]
                calls[name] = lambda x=x, kern=kern, p=p: kern.linear(x, p)
            t = time_interleaved(calls, rounds)
            print(
                f"| {n} x {k} | {m} | {t['fp32'] * 1e3:.3f} | "
                + " | ".join(f"{t[name] * 1e3:.3f}" for name in names)
                + " | "
                + " | ".join(f"{t['fp32'] / t[name]:.2f}" for name in names)
                + " |"
            )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=None, help="a trained run directory")
    parser.add_argument("--kernel", action="store_true", help="time the products alone")
    parser.add_argument(
        "--shapes",
        default="2048x512,256x64,64x256",
        help="weights N x K of the product table (default: a large one, then the up and down "
        "matrices of the lm-tokenmoe experts)",
    )
    parser.add_argument(
        "--generated", default=None, help="DxF: an untrained model with experts of that size"
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.threads < 1:
        parser.error("--rounds and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    if args.kernel:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
        print(environment())
        print(cpu_line() + "\n")
        kernel_table(args.rounds, shapes)
        return 0
    if (args.run is None) == (args.generated is None):
        parser.error("give one of --run DIR or --generated DxF (or --kernel)")
    if args.run is not None:
        run = load_run(args.run)
        model, title = run.model, f"{args.run} (step {run.step})"
        d = run.cfg.data
        _, val_docs = split_documents(load_corpus(d.corpus), d.val_fraction, d.seed)
        val = TokenStream.from_documents(val_docs, run.tokenizer)
        batches = eval_batches(val, d.batch_size, d.seq_len, d.eval_batches)
        prompts = {b: stream_prompt(val, b) for b in (1, 32)}
    else:
        model, title, prompts = generated(args.generated)
        batches = None
    models = model_variants(model)
    calls = {
        f"{name} b{b}": (lambda m=m, p=prompts[b]: decode(m, p, None))
        for name, m in models.items()
        for b in (1, 32)
    }
    samples = time_rounds(calls, args.rounds)
    seconds = {k: statistics.median(v) for k, v in samples.items()}

    def paired(name: str, b: int) -> float:
        """Median over rounds of float32's time over ``name``'s in the same round: a slow spell
        of the machine falls on both."""
        pairs = zip(samples[f"float32 b{b}"], samples[f"{name} b{b}"], strict=True)
        return statistics.median(f / t for f, t in pairs)

    print(f"# int8 experts: {title}\n")
    print(environment())
    print(cpu_line() + "\n")
    print(
        "| experts | expert MiB | val loss | change | tok/s b1 | tok/s b32 | x fp32 b1 | "
        "x fp32 b32 |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    base = None
    for name, m in models.items():
        loss = evaluate(m, batches) if batches is not None else None
        base = loss if base is None else base
        r1, r32 = (b * NEW / seconds[f"{name} b{b}"] for b in (1, 32))
        f1, f32 = paired(name, 1), paired(name, 32)
        cells = "- | -" if loss is None else f"{loss:.4f} | {loss - base:+.5f}"
        print(
            f"| {name} | {expert_bytes(m) / 2**20:.2f} | {cells} | "
            f"{r1:,.0f} | {r32:,.0f} | {f1:.2f} | {f32:.2f} |"
        )
    return 0


def model_variants(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """float32; int8 by the default rule; the rule with ``only_faster``; each kernel forced."""
    layer = next(m for m in model.modules() if isinstance(m, ms.MoE))
    rule = int8_kernel(layer.experts.d_model * layer.experts.d_ff).name
    models = {"float32": model}
    for name, kw in [
        (f"int8 default ({rule})", {}),
        ("only_faster", {"only_faster": True}),
        *((f"int8 {k}", {"kernel": k}) for k in kernels()),
    ]:
        models[name] = copy.deepcopy(model)
        ms.inference.quantize(models[name], **kw)
    return models


def generated(shape: str) -> tuple[torch.nn.Module, str, dict[int, torch.Tensor]]:
    """An untrained MoE LM (2 MoE layers x 8 experts of D x F, top-2, fp32) and random
    prompts: decoding speed at a size a trained run here does not have."""
    d, f = (int(v) for v in shape.split("x"))
    torch.manual_seed(0)
    cfg = LMConfig(
        vocab_size=256,
        max_seq_len=PROMPT + NEW + 1,
        d_model=d,
        n_layers=2,
        n_heads=8,
        d_ff=f,
        moe=ms.MoEConfig(num_experts=8, top_k=2, router="topk", capacity_factor=None),
        moe_every=1,
    )
    gen = torch.Generator().manual_seed(1)
    prompts = {b: torch.randint(0, 256, (b, PROMPT), generator=gen) for b in (1, 32)}
    title = f"generated, untrained: 2 MoE layers x 8 experts of D={d}, F={f}, top-2"
    return MoELM(cfg).eval(), title, prompts


if __name__ == "__main__":
    raise SystemExit(main())
