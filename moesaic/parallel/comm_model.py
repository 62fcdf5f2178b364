"""A model of an expert-parallel training step's communication at 8 to 1024 GPUs.

Per MoE layer and rank, expert parallelism over W ranks exchanges (Lepikhin et al. 2021,
GShard §2.2; ``moesaic.parallel.alltoall``):

- forward: the per-expert counts (W x E/W int64), the routed rows out to the experts' ranks and
  the results back: ``2 * rows * D * bytes`` with ``rows = k * T`` dropless, or at most the
  ``E * capacity`` slots with a capacity factor;
- backward: the same two row exchanges in reverse (the counts are reused).

A rank's all-to-all input holds every row, its own share (1/W) included, so the byte counts
here are what ``all_to_all_single`` is handed, the quantity measured on gloo; the time charges
only the rows that leave the rank, at the intra-node bandwidth for destinations on the same node
and the inter-node bandwidth for the rest. Dense parameters sharded by FSDP over S ranks add an
all-gather in forward, another in backward and a reduce-scatter of the gradients, each moving
``(S - 1) / S`` of the parameters' bytes per rank. Compute is the training FLOPs (3x forward)
over the device's sustained FLOP/s. Nothing overlaps, so the step time is an upper bound and the
shares say which part dominates.
"""

from __future__ import annotations

import dataclasses
import math

__all__ = ["Links", "MoEStep", "alltoall_bytes", "fsdp_bytes", "step_time"]

COUNT_BYTES = 8  # the count exchange sends int64 counts


@dataclasses.dataclass(frozen=True)
class Links:
    """Bandwidths in GB/s per GPU and direction, and GPUs per node (defaults: an H100 node,
    NVLink 4 at 450 GB/s per direction, one 400 Gb/s InfiniBand NIC per GPU = 50 GB/s)."""

    intra_node_gbs: float = 450.0
    inter_node_gbs: float = 50.0
    gpus_per_node: int = 8
    latency_s: float = 10e-6  # per collective call
    device_tflops: float = 400.0  # sustained dense bf16 TFLOP/s per GPU

    def __post_init__(self) -> None:
        for name in ("intra_node_gbs", "inter_node_gbs", "device_tflops"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        if self.gpus_per_node < 1 or self.latency_s < 0:
            raise ValueError(
                f"gpus_per_node={self.gpus_per_node} must be >= 1 and latency_s="
                f"{self.latency_s} >= 0"
            )


@dataclasses.dataclass(frozen=True)
class MoEStep:
    """One training step of an MoE Transformer on each rank."""

    tokens: int  # T: tokens per rank per step
    d_model: int
    d_ff: int  # each expert's hidden width
    n_layers: int
    moe_layers: int
    num_experts: int
    top_k: int
    capacity_factor: float | None = None  # None: dropless
    dtype_bytes: int = 2  # bf16 activations on the wire
    dense_params: int = 0  # parameters outside the experts (FSDP-sharded)
    vocab: int = 32000
    # GShard / DeepSpeed-MoE / Tutel exchange fixed E x capacity buffers, padding included;
    # moesaic's uneven splits send only the kept rows (False)
    padded: bool = False

    def train_flops(self) -> float:
        """Training FLOPs per rank per step: 3x the forward's matmuls (attention projections,
        k experts' or the dense FFN per layer, the output head; attention scores left out)."""
        D, F, T = self.d_model, self.d_ff, self.tokens
        attn = 4 * D * D
        ffn_dense = 2 * D * F
        per_token = self.n_layers * attn + (self.n_layers - self.moe_layers) * ffn_dense
        per_token += self.moe_layers * (self.top_k * ffn_dense + D * self.num_experts)
        per_token += D * self.vocab
        return 3 * 2 * per_token * T


def _rows(step: MoEStep) -> int:
    """Rows a rank hands to one all-to-all: its k * T assignments, or at most its E slots of
    ``capacity`` each (``moesaic.dispatch.expert_capacity``: ceil(factor * k * T / E)); with
    ``padded`` buffers, all E * capacity slots whatever they hold."""
    rows = step.top_k * step.tokens
    if step.capacity_factor is None:
        return rows
    slots = step.num_experts * math.ceil(step.capacity_factor * rows / step.num_experts)
    return slots if step.padded else min(rows, slots)


def alltoall_bytes(step: MoEStep, world: int) -> dict[str, int]:
    """Bytes one rank hands to ``all_to_all_single`` per MoE layer: ``forward`` (rows out and
    back, plus the counts) and ``backward`` (rows out and back), averaged over ranks (a rank
    hosting busier experts returns more rows; the mean is exact)."""
    if world < 1 or step.num_experts % world:
        raise ValueError(f"world={world} must divide num_experts={step.num_experts}")
    if step.padded and step.capacity_factor is None:
        raise ValueError("padded=True needs a capacity_factor (dropless buffers are not padded)")
    if world == 1:
        return {"forward": 0, "backward": 0}
    rows = 2 * _rows(step) * step.d_model * step.dtype_bytes
    counts = world * (step.num_experts // world) * COUNT_BYTES
    return {"forward": rows + counts, "backward": rows}


def fsdp_bytes(params: int, shard: int, dtype_bytes: int = 2) -> dict[str, int]:
    """Bytes one rank sends for FSDP over ``shard`` ranks per step: all-gather of the
    parameters in forward and again in backward, reduce-scatter of the gradients."""
    if shard <= 1:
        return {"all_gather": 0, "reduce_scatter": 0}
    moved = params * dtype_bytes * (shard - 1) // shard
    return {"all_gather": 2 * moved, "reduce_scatter": moved}


def step_time(step: MoEStep, world: int, links: Links = Links(), shard: int = 1) -> dict:
    """Seconds per step on each rank: ``compute``, ``alltoall`` (every MoE layer, forward and
    backward), ``fsdp`` and their sum ``total``; ``alltoall_share`` of the total;
    ``break_even_inter_node_gbs``, the inter-node bandwidth below which all-to-all takes longer
    than compute (0 when nothing leaves the node)."""
    a2a = alltoall_bytes(step, world)
    per_layer = a2a["forward"] + a2a["backward"]
    # the share of a rank's rows that stays on it, goes to its node, leaves the node
    local = 1 / world
    same_node = (min(world, links.gpus_per_node) - 1) / world
    off_node = 1 - local - same_node
    gbs = 1e9
    calls_s = (5 if world > 1 else 0) * links.latency_s  # counts, 2 forward, 2 backward calls
    intra_s = per_layer * same_node / (links.intra_node_gbs * gbs)
    a2a_s = step.moe_layers * (
        intra_s + per_layer * off_node / (links.inter_node_gbs * gbs) + calls_s
    )
    fsdp = fsdp_bytes(step.dense_params, shard, step.dtype_bytes)
    fsdp_bw = links.intra_node_gbs if shard <= links.gpus_per_node else links.inter_node_gbs
    fsdp_s = (fsdp["all_gather"] + fsdp["reduce_scatter"]) / (fsdp_bw * gbs)
    compute_s = step.train_flops() / (links.device_tflops * 1e12)
    total = compute_s + a2a_s + fsdp_s
    # the inter-node bandwidth below which all-to-all takes longer than compute
    budget = compute_s / step.moe_layers - intra_s - calls_s
    off_bytes = per_layer * off_node
    if off_bytes == 0:
        break_even = 0.0  # nothing leaves the node
    else:
        break_even = math.inf if budget <= 0 else off_bytes / budget / gbs
    return {
        "compute": compute_s,
        "alltoall": a2a_s,
        "fsdp": fsdp_s,
        "total": total,
        "alltoall_share": a2a_s / total,
        "bytes_per_layer": per_layer,
        "off_node_fraction": off_node,
        "break_even_inter_node_gbs": break_even,
    }
