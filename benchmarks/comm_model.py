"""Where all-to-all starts to dominate an expert-parallel training step, from 8 to 1024 GPUs.

The model is ``moesaic.parallel.comm_model`` (its docstring has the formulas). First the model's
all-to-all byte counts are checked against what the expert-parallel layer hands to
``all_to_all_single`` on 2 and 4 gloo processes here; then a Mixtral-8x7B-like step (D=4096,
F=14336, 32 MoE layers, 8192 tokens per GPU, bf16) is scaled with expert parallelism over
``min(W, E)`` ranks (beyond E, groups of E ranks are data-parallel replicas) and FSDP over all W
for the dense parameters. Bandwidths and FLOP/s are parameters (defaults: H100 nodes of 8, NVLink
450 GB/s, 50 GB/s InfiniBand per GPU, 400 TFLOP/s sustained).

    python benchmarks/comm_model.py --plot docs/img/comm_model.png
    python benchmarks/comm_model.py --inter-node-gbs 25 --experts 64    # slower network
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # python benchmarks/<name>.py

import torch
import torch.distributed as dist

from benchmarks.harness import AllToAllMeter
from moesaic.parallel.comm_model import Links, MoEStep, alltoall_bytes, step_time
from moesaic.parallel.launch import run_local

WORLDS = [8, 16, 32, 64, 128, 256, 512, 1024]
CHECK = MoEStep(tokens=256, d_model=32, d_ff=64, n_layers=1, moe_layers=1, num_experts=8,
                top_k=2, dtype_bytes=4)  # fmt: skip


def _measured(rank: int, world: int) -> list[float]:
    """Mean over ranks of the bytes handed to all_to_all_single, forward and backward."""
    import moesaic as ms

    groups = ms.parallel.init(expert=world)
    torch.manual_seed(0)
    c = CHECK
    layer = ms.MoE(c.d_model, c.d_ff, c.num_experts, router="topk", top_k=c.top_k,
                   expert_group=groups.expert_group)  # fmt: skip
    x = torch.randn(c.tokens, c.d_model, generator=torch.Generator().manual_seed(rank))
    with AllToAllMeter() as meter:
        y = layer(x.requires_grad_())
        forward = meter.bytes
        y.square().sum().backward()
    mean = torch.tensor([forward, meter.bytes - forward], dtype=torch.float64)
    dist.all_reduce(mean)
    return (mean / world).tolist()


def mixtral_like(args, **changes) -> MoEStep:
    D, L, V = 4096, 32, 32000
    dense = L * 4 * D * D + V * D  # attention projections and the embedding
    step = MoEStep(
        tokens=args.tokens,
        d_model=D,
        d_ff=14336,
        n_layers=L,
        moe_layers=L,
        num_experts=args.experts,
        top_k=args.top_k,
        dense_params=dense,
        vocab=V,
    )
    return dataclasses.replace(step, **changes)


def scaled(step: MoEStep, world: int, links: Links) -> dict:
    return step_time(step, min(world, step.num_experts), links, shard=world)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per GPU per step")
    parser.add_argument("--intra-node-gbs", type=float, default=450.0)
    parser.add_argument("--inter-node-gbs", type=float, default=50.0)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--tflops", type=float, default=400.0, help="sustained TFLOP/s per GPU")
    parser.add_argument("--plot", type=Path, default=None, help="write the plot here (PNG)")
    parser.add_argument("--no-check", action="store_true", help="skip the gloo measurement")
    args = parser.parse_args(argv)
    links = Links(args.intra_node_gbs, args.inter_node_gbs, args.gpus_per_node,
                  device_tflops=args.tflops)  # fmt: skip
    if not args.no_check:
        print("## The model's bytes against the layer's, gloo on this machine\n")
        print("| W | forward measured / model | backward measured / model |")
        print("|---|---|---|")
        for w in (2, 4):
            fwd, bwd = run_local(_measured, w)[0]
            want = alltoall_bytes(CHECK, w)
            print(f"| {w} | {fwd:,.0f} / {want['forward']:,} | {bwd:,.0f} / {want['backward']:,} |")
        print()
    base = mixtral_like(args)
    print(f"## Step time per GPU: E={args.experts}, k={args.top_k}, T={args.tokens} per GPU\n")
    print(f"{links}\n")
    print(
        "| GPUs | EP group | off-node rows | compute s | all-to-all s | FSDP s | "
        "all-to-all share | all-to-all > compute below |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for w in WORLDS:
        r = scaled(base, w, links)
        rows.append((w, r))
        print(
            f"| {w} | {min(w, args.experts)} | {r['off_node_fraction']:.0%} | {r['compute']:.3f} | "
            f"{r['alltoall']:.3f} | {r['fsdp']:.3f} | {r['alltoall_share']:.0%} | "
            f"{_gbs(r['break_even_inter_node_gbs'])} |"
        )
    over = [w for w, r in rows if r["alltoall"] > r["compute"]]
    print(
        f"\nall-to-all exceeds compute from {over[0]} GPUs on" if over else
        f"\nall-to-all stays below compute at every size at {args.inter_node_gbs} GB/s between "
        "nodes; the last column is the inter-node bandwidth where it would take over"
    )  # fmt: skip
    print("\n## What capacity factor, top-k and expert count do (at 256 GPUs)\n")
    print("| variant | all-to-all s | compute s | all-to-all share | all-to-all > compute below |")
    print("|---|---:|---:|---:|---:|")
    variants = [("dropless", {})]
    variants += [(f"capacity {cf}", {"capacity_factor": cf}) for cf in (1.0, 1.25, 2.0)]
    variants += [
        (
            f"capacity {cf}, padded buffers (GShard, DeepSpeed)",
            {"capacity_factor": cf, "padded": True},
        )
        for cf in (1.0, 1.25, 2.0)
    ]
    variants += [(f"top-{k}", {"top_k": k}) for k in (1, 4)]
    variants += [(f"{e} experts", {"num_experts": e}) for e in (8, 64, 1024)]
    # DeepSeekMoE-style fine-grained experts: 4x the experts at a quarter of the width, 4x k
    variants += [("fine-grained: k=8, F/4", {"top_k": 8, "d_ff": 14336 // 4})]
    for name, change in variants:
        r = scaled(dataclasses.replace(base, **change), 256, links)
        print(
            f"| {name} | {r['alltoall']:.3f} | {r['compute']:.3f} | {r['alltoall_share']:.0%} | "
            f"{_gbs(r['break_even_inter_node_gbs'])} |"
        )
    if args.plot:
        plot(rows, args, args.plot)
        print(f"\nplot: {args.plot}")
    return 0


def _gbs(value: float) -> str:
    if value == 0:
        return "never (one node)"
    return "always" if value == float("inf") else f"{value:.1f} GB/s"


def plot(rows, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worlds = [w for w, _ in rows]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for key, label in (("compute", "compute"), ("alltoall", "all-to-all"), ("fsdp", "FSDP")):
        ax.plot(worlds, [r[key] for _, r in rows], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("GPUs")
    ax.set_ylabel("seconds per step (no overlap)")
    ax.set_title(f"Expert-parallel step: E={args.experts}, k={args.top_k}, T={args.tokens}/GPU")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
