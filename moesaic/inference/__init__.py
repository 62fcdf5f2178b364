"""Inference: sampling with a KV cache; packed expert weights for CPU serving."""

from moesaic.inference.generate import generate_ids
from moesaic.inference.packing import pack_experts, unpack_experts

__all__ = ["generate_ids", "pack_experts", "unpack_experts"]
