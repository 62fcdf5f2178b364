"""Total and activated parameter counts.

Activated parameters are those a token uses: everything outside the experts, plus, per MoE
layer, ``top_k / num_experts`` of its expert parameters (a token visits k of the E experts; for
expert choice k is the average number of experts per token).
"""

from __future__ import annotations

import dataclasses

from torch import nn

from moesaic.layer import MoE

__all__ = ["ParameterCount", "count_parameters"]


@dataclasses.dataclass(frozen=True)
class ParameterCount:
    total: int
    activated: float  # per token

    def __str__(self) -> str:
        return f"{_human(self.total)} total, {_human(self.activated)} activated per token"


def count_parameters(model: nn.Module) -> ParameterCount:
    total = sum(p.numel() for p in model.parameters())  # shared (tied) tensors counted once
    inactive = 0.0
    for m in model.modules():
        if isinstance(m, MoE):
            local = sum(p.numel() for p in m.experts.parameters())
            # under expert parallelism this process holds E_local of the E experts
            shards = m.num_experts / m.experts.num_experts
            total += round(local * (shards - 1))
            inactive += local * shards * (1 - m.top_k / m.num_experts)
    return ParameterCount(total=total, activated=total - inactive)


def _human(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"
