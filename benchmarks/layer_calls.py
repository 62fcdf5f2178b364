"""One MoE layer's forward-only and fwd+bwd time in this process: for A/B runs of two checkouts,
alternating processes (``PYTHONPATH=CHECKOUT python benchmarks/layer_calls.py ...``).

    python benchmarks/layer_calls.py --tokens 2048 --experts 32 --top-k 1
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence

import torch

import moesaic as ms


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/layer_calls.py", description=__doc__)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=1)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--d-ff", type=int, default=2048)
    parser.add_argument("--calls", type=int, default=7)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    layer = ms.MoE(args.d_model, args.d_ff, args.experts, router="topk", top_k=args.top_k)
    x, g = torch.randn(args.tokens, args.d_model), torch.randn(args.tokens, args.d_model)

    def forward() -> None:
        with torch.inference_mode():
            layer(x)

    def step() -> None:
        for p in layer.parameters():
            p.grad = None
        layer(x).backward(g)

    medians = {}
    for name, fn in (("fwd", forward), ("fwd+bwd", step)):
        fn()  # warm-up
        times = []
        for _ in range(args.calls):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        medians[name] = 1e3 * statistics.median(times)
    print(" ".join(f"{name} {ms_:.1f} ms" for name, ms_ in medians.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
