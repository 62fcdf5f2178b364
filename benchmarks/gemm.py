"""Where moesaic's expert speed on CPU comes from, measured side by side in one process.

1. ``products``: one expert product (M rows, K=D, N=F, the weight in the experts' transposed
   layout) on torch.mm, oneDNN (``moesaic.kernels.cpu.gemm.matmul``) and oneDNN swapped,
   single-threaded (as the expert workers run it) and on all intra-op threads: the numbers
   behind ``CpuTuning.min_rows``, ``swap_rows`` / ``swap_pad`` and ``gemm="auto"``.
2. ``workers``: the MoE layer with whole experts on worker threads against the intra-op loop,
   on the grid behind ``CpuTuning.loop_rows`` and ``loop_max_total``.
3. ``sizes``: training steps (fwd+bwd) of layers of growing expert size on oneDNN over torch.mm,
   a new input every step so the rows per expert keep changing (oneDNN compiles a kernel for
   every new row count): the numbers behind ``CpuTuning.min_weight``.
4. ``packed``: forward-only, the layer as it comes and with ``experts.pack_for_inference()``,
   against the token-blocked dense FFN of equal active FLOPs (peers.py's limit: the faster of
   torch.mm and oneDNN), on peers.py's grid, fp32 or (``--dtype bfloat16``) bf16.
5. ``weights``: forward-only, the experts alone (inputs already in expert order, T*K/E rows
   each) with their E distinct weights and with every expert reading expert 0's weights, which
   then stay in cache, against the same dense limit: what reading E experts' weights from
   memory on every forward costs, which a dense FFN of equal active FLOPs (K experts' worth of
   weights) does not pay. fp32 or ``--dtype bfloat16``.
6. ``gate``: a router's gate product x (T, D) @ w^T (D, E) and its two gradient products on
   oneDNN (as ``moesaic.kernels.cpu.gate`` runs them) and on torch.mm, on all intra-op threads:
   the numbers behind ``CpuTuning.gate_min_rows``.

Shape legend (docs/shapes.md): T tokens, D model dim, F expert hidden, E experts, K top-k,
M rows of a product.

    python benchmarks/gemm.py               # every part (a few minutes on 2 threads)
    python benchmarks/gemm.py products      # one product, M rows x 512 x 2048
    python benchmarks/gemm.py workers       # the layer on the T/E/k grid
    python benchmarks/gemm.py sizes         # training steps by expert size, oneDNN vs torch.mm
    python benchmarks/gemm.py packed        # forward-only with packed expert weights
    python benchmarks/gemm.py weights       # experts with distinct vs shared (cached) weights
    python benchmarks/gemm.py gate          # the router's gate products, oneDNN vs torch.mm
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # python benchmarks/<name>.py

from benchmarks.harness import DTYPES, BlockedDense, environment, time_interleaved
from moesaic.cli.bench import OneDNNBlockedDense, infer_fn, train_fn
from moesaic.experts import Experts
from moesaic.experts.experts import expert_weights
from moesaic.kernels.cpu import CpuBackend, CpuTuning
from moesaic.kernels.cpu.capability import cpu_capability
from moesaic.kernels.cpu.gemm import matmul, onednn_available, packable
from moesaic.kernels.cpu.tuning import DEFAULT_TUNING
from moesaic.layer import MoE

__all__ = ["main", "products", "workers", "sizes", "packed", "weights", "gate", "shared_weights"]

PARTS = ("products", "workers", "sizes", "packed", "weights", "gate")
SIZES = ((64, 256, 32), (128, 512, 32), (256, 1024, 16), (512, 2048, 8))  # (D, F, E), T=8192
ROWS = (1, 2, 4, 8, 16, 48, 63, 64, 65, 72, 79, 128, 256, 1024)
PEERS_GRID = tuple((T, E, K) for T in (2048, 8192) for E in (8, 32) for K in (1, 2))
GRID = ((2048, 32, 1), (2048, 32, 2), (2048, 8, 1), (2048, 8, 2), (8192, 32, 1), (8192, 8, 2))


def products(d_model: int, d_ff: int, repeats: int) -> list[str]:
    """GFLOP/s of x (M, D) @ w (D, F) on torch.mm, oneDNN and oneDNN swapped (w^T x^T, the
    weight as the left operand), 1 thread and all threads, w in the experts' layout."""
    threads = torch.get_num_threads()
    lines = [
        "| threads | rows | torch.mm GFLOP/s | oneDNN GFLOP/s | swapped GFLOP/s "
        "| oneDNN / torch.mm time | swapped / oneDNN time |",
        "|---|---|---|---|---|---|---|",
    ]
    w = expert_weights(1, d_model, d_ff).normal_()[0]  # (D, F) view of an (F, D) matrix
    for n in sorted({1, threads}):
        torch.set_num_threads(n)
        try:
            for m in ROWS:
                x = torch.randn(m, d_model)
                fns = {
                    "mm": lambda x=x: torch.mm(x, w),
                    "onednn": lambda x=x: _onednn(x, w),
                    "swapped": lambda x=x: _onednn(w.t(), x.t()),
                }
                t = time_interleaved(_repeat(fns, max(1, 2048 // m)), repeats)
                gflops = {
                    k: 2.0 * m * d_model * d_ff * max(1, 2048 // m) / v / 1e9 for k, v in t.items()
                }
                lines.append(
                    f"| {n} | {m} | {gflops['mm']:.0f} | {gflops['onednn']:.0f} "
                    f"| {gflops['swapped']:.0f} | {t['onednn'] / t['mm']:.2f} "
                    f"| {t['swapped'] / t['onednn']:.2f} |"
                )
        finally:
            torch.set_num_threads(threads)
    return lines


def gate(d_model: int, repeats: int) -> list[str]:
    """Microseconds of the gate product and its gradient products, oneDNN against torch.mm."""
    lines = [
        "| T | E | forward oneDNN / torch.mm us | grad x | grad w | oneDNN / torch.mm time |",
        "|---|---|---|---|---|---|",
    ]
    for T in (256, 512, 2048, 8192):
        for E in (8, 32):
            x, w, g = torch.randn(T, d_model), torch.randn(E, d_model), torch.randn(T, E)
            n = max(1, 8192 // T)
            fns = {
                "fwd onednn": lambda x=x, w=w: matmul(x, w.t(), onednn=DEFAULT_TUNING),
                "fwd mm": lambda x=x, w=w: torch.mm(x, w.t()),
                "gx onednn": lambda g=g, w=w: matmul(g, w, onednn=DEFAULT_TUNING),
                "gx mm": lambda g=g, w=w: torch.mm(g, w),
                "gw onednn": lambda g=g, x=x: matmul(g.t().contiguous(), x, onednn=DEFAULT_TUNING),
                "gw mm": lambda g=g, x=x: torch.mm(g.t(), x),
            }
            t = {k: 1e6 * v / n for k, v in time_interleaved(_repeat(fns, n), repeats).items()}
            cells = [f"{t[p + ' onednn']:.0f} / {t[p + ' mm']:.0f}" for p in ("fwd", "gx", "gw")]
            total = sum(t[p + " onednn"] for p in ("fwd", "gx", "gw"))
            total_mm = sum(t[p + " mm"] for p in ("fwd", "gx", "gw"))
            lines.append(f"| {T} | {E} | {' | '.join(cells)} | {total / total_mm:.2f} |")
    return lines


def _onednn(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    # straight to oneDNN, below min_rows too (matmul would hand those to torch.mm)
    return torch.ops.mkldnn._linear_pointwise(x, w.t(), None, "none", [], None)


def _repeat(fns: dict[str, Callable[[], object]], n: int) -> dict[str, Callable[[], None]]:
    def loop(fn: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            for _ in range(n):
                fn()

        return run

    return {name: loop(fn) for name, fn in fns.items()}


def workers(d_model: int, d_ff: int, repeats: int) -> list[str]:
    """fwd+bwd and fwd ms of the layer with experts on workers and on the intra-op loop."""
    lines = [
        "| T | E | k | rows/expert | family | fwd+bwd workers / loop | fwd workers / loop |",
        "|---|---|---|---|---|---|---|",
    ]
    for T, E, K in GRID:
        torch.manual_seed(0)
        x, g = torch.randn(T, d_model), torch.randn(T, d_model)
        for family in ("gelu", "swiglu"):
            layer = MoE(d_model, d_ff, E, router="topk", top_k=K, activation=family)
            ratio = []
            for train in (True, False):
                fns = {mode: _layer_call(layer, x, g, mode, train) for mode in ("workers", "loop")}
                t = time_interleaved(fns, repeats)
                ratio.append(t["workers"] / t["loop"])
            lines.append(
                f"| {T} | {E} | {K} | {T * K // E} | {family} | {ratio[0]:.2f} | {ratio[1]:.2f} |"
            )
    return lines


def sizes(repeats: int, tokens: int = 8192, inputs: int = 16) -> list[str]:
    """fwd+bwd ms of top-1 layers on oneDNN and on torch.mm, inputs changing every step."""
    lines = [
        "| D | F | D*F | E | oneDNN ms | torch.mm ms | oneDNN / torch.mm |",
        "|---|---|---|---|---|---|---|",
    ]
    for D, Fh, E in SIZES:
        torch.manual_seed(0)
        xs = [torch.randn(tokens, D) for _ in range(inputs)]
        g = torch.randn(tokens, D)
        fns = {}
        for gemm in ("onednn", "torch"):
            layer = MoE(D, Fh, E, router="topk", expert_backend=CpuBackend(CpuTuning(gemm=gemm)))
            fns[gemm] = _changing_step(layer, xs, g)
        t = time_interleaved(fns, repeats)
        lines.append(
            f"| {D} | {Fh} | {D * Fh} | {E} | {1e3 * t['onednn']:.1f} | "
            f"{1e3 * t['torch']:.1f} | {t['onednn'] / t['torch']:.2f} |"
        )
    return lines


def _changing_step(layer: MoE, xs: list[torch.Tensor], g: torch.Tensor) -> Callable[[], None]:
    step = iter(range(10**9))

    def run() -> None:
        for p in layer.parameters():
            p.grad = None
        layer(xs[next(step) % len(xs)]).backward(g)

    return run


def packed(d_model: int, d_ff: int, repeats: int, dtype: torch.dtype = torch.float32) -> list[str]:
    """Forward-only ms of the layer unpacked and packed, and both over the dense limit (the
    faster of the torch.mm and the oneDNN token-blocked dense FFN, as in peers.py)."""
    if not onednn_available(dtype):
        return [
            f"packing {str(dtype).removeprefix('torch.')} weights is not available on this CPU "
            f"({cpu_capability().describe()}): such experts run on torch.mm unpacked"
        ]
    lines = [
        "| T | E | k | rows/expert | family | fwd ms | packed fwd ms | limit ms | / limit | "
        "packed / limit |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    # D=512, F=2048 fp32 experts run on oneDNN under "auto" anyway, bf16 ones on torch.mm
    # unpacked and on oneDNN packed: each against the layer users get by default (small test
    # sizes force oneDNN to be packable at all)
    probe = torch.empty(0, dtype=dtype)
    gemm = "auto" if packable(CpuTuning(), probe, d_model * d_ff) else "onednn"
    for T, E, K in PEERS_GRID:
        torch.manual_seed(0)
        x = torch.randn(T, d_model, dtype=dtype)
        for family in ("gelu", "swiglu"):
            kw = {"router": "topk", "top_k": K, "activation": family}
            plain, fast = (
                MoE(d_model, d_ff, E, **kw),
                MoE(d_model, d_ff, E, **kw, expert_backend=CpuBackend(CpuTuning(gemm=gemm))),
            )
            fast.load_state_dict(plain.state_dict())
            plain.to(dtype)
            fast.to(dtype).experts.pack_for_inference(max(1, T * K // E))
            fns = {name: infer_fn(m, x) for name, m in (("plain", plain), ("packed", fast))}
            t, limit = _against_limit(fns, x, d_model, K * d_ff, family, repeats)
            lines.append(
                f"| {T} | {E} | {K} | {T * K // E} | {family} | {1e3 * t['plain']:.1f} | "
                f"{1e3 * t['packed']:.1f} | {1e3 * limit:.1f} | "
                f"{t['plain'] / limit:.2f} | {t['packed'] / limit:.2f} |"
            )
    return lines


def _against_limit(
    fns: dict[str, Callable[[], None]],
    x: torch.Tensor,
    d_model: int,
    width: int,
    family: str,
    repeats: int,
) -> tuple[dict[str, float], float]:
    """``fns`` timed forward-only beside the two token-blocked dense FFNs of hidden ``width`` on
    ``x`` (torch.mm and oneDNN), interleaved: (median seconds by name, the dense limit, the
    faster of the two, as in peers.py)."""
    fns = dict(fns)
    for name, cls in (("mm", BlockedDense), ("onednn", OneDNNBlockedDense)):
        fns[name] = infer_fn(cls(d_model, width, family).to(x.dtype), x)
    t = time_interleaved(fns, repeats)
    return t, min(t["mm"], t["onednn"])


def shared_weights(experts: Experts) -> Experts:
    """A forward-only copy of ``experts`` whose E experts all compute with expert 0's weights
    (and biases), kept in the experts' memory layout: stride-0 views of one matrix, which stays
    in cache from one expert to the next."""
    shared = copy.deepcopy(experts)
    for name, p in shared.named_parameters(recurse=False):
        one = p.detach()[:1]
        if one.dim() == 3:  # (1, K, N), a view of (1, N, K): expand the contiguous matrix
            one = one.transpose(1, 2).expand(p.shape[0], -1, -1).transpose(1, 2)
        else:
            one = one.expand_as(p)
        setattr(shared, name, nn.Parameter(one, requires_grad=False))
    return shared


def weights(d_model: int, d_ff: int, repeats: int, dtype: torch.dtype = torch.float32) -> list[str]:
    """Forward-only ms of the experts alone with distinct and with shared weights
    (``shared_weights``), against the dense limit (as in ``packed``)."""
    lines = [
        "| T | E | k | rows/expert | weights MiB | distinct ms | shared ms | limit ms | "
        "distinct / limit | shared / limit | distinct - shared ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for T, E, K in GRID:
        torch.manual_seed(0)
        rows = T * K // E
        x = torch.randn(rows * E, d_model, dtype=dtype)
        experts = Experts(E, d_model, d_ff, "gelu").to(dtype)
        fns = {
            "distinct": _experts_call(experts, x),
            "shared": _experts_call(shared_weights(experts), x),
        }
        t, limit = _against_limit(fns, x[:T], d_model, K * d_ff, "gelu", repeats)
        mib = sum(p.numel() * p.element_size() for p in experts.parameters()) / 2**20
        lines.append(
            f"| {T} | {E} | {K} | {rows} | {mib:.0f} | {1e3 * t['distinct']:.1f} | "
            f"{1e3 * t['shared']:.1f} | {1e3 * limit:.1f} | {t['distinct'] / limit:.2f} | "
            f"{t['shared'] / limit:.2f} | {1e3 * (t['distinct'] - t['shared']):.1f} |"
        )
    return lines


def _experts_call(experts: Experts, x: torch.Tensor) -> Callable[[], None]:
    counts = [x.shape[0] // experts.num_experts] * experts.num_experts

    def run() -> None:
        with torch.inference_mode():
            experts(x, counts)

    return run


def _layer_call(layer: MoE, x, g, mode: str, train: bool) -> Callable[[], None]:
    call = train_fn(layer, x, g) if train else infer_fn(layer, x)

    # force the mode whatever the rule says: workers for every size, or the loop
    backend = CpuBackend(CpuTuning(workers="threads" if mode == "workers" else "loop"))

    def run() -> None:
        layer.experts.backend = backend
        call()

    return run


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/gemm.py", description=__doc__.splitlines()[0])
    parser.add_argument("part", nargs="*", help=f"any of {', '.join(PARTS)} (default: all)")
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--d-ff", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default="float32",
        help="dtype of the packed and weights parts (the others run fp32)",
    )
    args = parser.parse_args(argv)
    for part in args.part:
        if part not in PARTS:
            parser.error(f"part={part!r} must be one of {', '.join(PARTS)}")
    if not onednn_available():
        print("this torch build has no oneDNN: nothing to compare")
        return 1
    parts = args.part or PARTS
    print(
        f"D={args.d_model}, F={args.d_ff}, fp32 (packed, weights: {args.dtype}), median of "
        f"{args.repeats} interleaved rounds"
    )
    print(environment() + "\n")
    if "products" in parts:
        print("\n".join(products(args.d_model, args.d_ff, args.repeats)) + "\n")
    if "workers" in parts:
        print("\n".join(workers(args.d_model, args.d_ff, args.repeats)) + "\n")
    if "sizes" in parts:
        print("\n".join(sizes(args.repeats)) + "\n")
    dtype = getattr(torch, args.dtype)
    if "packed" in parts:
        print("\n".join(packed(args.d_model, args.d_ff, args.repeats, dtype)) + "\n")
    if "weights" in parts:
        print("\n".join(weights(args.d_model, args.d_ff, args.repeats, dtype)) + "\n")
    if "gate" in parts:
        print("\n".join(gate(args.d_model, args.repeats)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
