"""Inference: sampling with a KV cache."""

from moesaic.inference.generate import generate_ids

__all__ = ["generate_ids"]
