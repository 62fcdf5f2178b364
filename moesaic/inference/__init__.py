"""Inference: batched sampling with a KV cache; TaskMoE extraction; packed expert weights."""

from moesaic.inference.extract import extract, task_experts
from moesaic.inference.generate import generate_ids
from moesaic.inference.packing import pack_experts, unpack_experts

__all__ = ["extract", "generate_ids", "pack_experts", "task_experts", "unpack_experts"]
