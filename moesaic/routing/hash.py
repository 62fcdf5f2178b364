"""Hash routing (Roller et al. 2021, "Hash Layers for Large Sparse Models"): no parameters.

Each token id goes to a fixed expert chosen by a balanced hash: ids are cut into blocks of E
consecutive ids and every block is mapped onto the E experts by a pseudo-random rotation, so any
vocabulary whose size is a multiple of E is split exactly evenly. Token ids come from
``ms.routing_context(token_ids=...)``; without them the token's flat position is used.

Shape legend (docs/shapes.md): T tokens, E experts, K top-k.
"""

from __future__ import annotations

import torch

from moesaic.context import RoutingContext
from moesaic.routing.base import Router, Routing
from moesaic.routing.registry import register_router

__all__ = ["HashRouter", "balanced_hash"]


def balanced_hash(ids: torch.Tensor, num_experts: int, seed: int = 0) -> torch.Tensor:
    """Expert of each id: ``(id + rotation(id // E)) % E``, a bijection on every block of E ids."""
    block = ids // num_experts + seed
    # murmur3's 32-bit finaliser on the block number (int64 arithmetic, masked to 32 bits)
    h = (block * 0x9E3779B1) & 0xFFFFFFFF
    h = ((h ^ (h >> 16)) * 0x85EBCA6B) & 0xFFFFFFFF
    h = ((h ^ (h >> 13)) * 0xC2B2AE35) & 0xFFFFFFFF
    h = h ^ (h >> 16)
    return (ids + h) % num_experts


@register_router("hash")
class HashRouter(Router):
    """Fixed balanced hash of token ids; for k > 1 the next k-1 experts (mod E), weight 1/k each."""

    default_top_k = 1
    reads_token_ids = True

    def __init__(
        self, d_model: int, num_experts: int, top_k: int | None = None, *, seed: int = 0, **kwargs
    ) -> None:
        super().__init__(d_model, num_experts, top_k, **kwargs)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed={seed!r} must be an int >= 0")
        self.seed = seed

    def forward(self, x_TD: torch.Tensor, context: RoutingContext) -> Routing:
        T, K, E = x_TD.shape[0], self.top_k, self.num_experts
        device = x_TD.device
        if context.token_ids is None:
            ids_T = torch.arange(T, device=device)
        else:
            ids_T = context.token_ids.reshape(-1).to(device=device, dtype=torch.long)
            if ids_T.numel() != T:
                raise ValueError(
                    f"routing_context(token_ids=...) holds {ids_T.numel()} ids but the layer "
                    f"sees T={T} tokens; they must be equal"
                )
        offset_K = torch.arange(K, device=device)
        expert_TK = self.decide(
            lambda: (balanced_hash(ids_T, E, self.seed)[:, None] + offset_K) % E
        )
        weight_TK = torch.full((T, K), 1.0 / K, dtype=self.router_dtype, device=device)
        probs_TE = torch.zeros(T, E, dtype=self.router_dtype, device=device)
        probs_TE.scatter_(1, expert_TK, weight_TK)
        zero = self._zero(x_TD)
        return Routing.from_topk(weight_TK, expert_TK, probs_TE, zero, zero)
