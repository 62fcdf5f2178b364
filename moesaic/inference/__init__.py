"""Inference: batched sampling with a KV cache; TaskMoE extraction; expert offloading; int8
experts; packed expert weights."""

from moesaic.inference.extract import extract, task_experts
from moesaic.inference.generate import generate_batch, generate_ids
from moesaic.inference.offload import OffloadStats, offload
from moesaic.inference.packing import pack_experts, unpack_experts
from moesaic.inference.quantize import quantize, quantize_rows

__all__ = [
    "OffloadStats",
    "extract",
    "generate_batch",
    "generate_ids",
    "offload",
    "pack_experts",
    "quantize",
    "quantize_rows",
    "task_experts",
    "unpack_experts",
]
