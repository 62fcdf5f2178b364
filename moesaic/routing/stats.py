"""Routing statistics of one MoE forward pass.

Kept as detached device tensors; the float properties read them (a host sync) only when asked, so
recording statistics costs the training step nothing on an accelerator.

Shape legend (docs/shapes.md): T tokens, E experts.
"""

from __future__ import annotations

import torch

__all__ = ["RoutingStats"]


class RoutingStats:
    """What the router did in the layer's last forward.

    Attributes:
        tokens_per_expert: LongTensor (E,), assignments each expert processed (after capacity).
        requested_per_expert: LongTensor (E,), assignments the router made per expert (before).
        dropped_fraction: float, share of assignments dropped by capacity.
        entropy: float, mean over tokens of the entropy (nats) of the routing distribution.
        load_cv: float, coefficient of variation (std / mean, population std) of
            ``requested_per_expert``; 0 is perfect balance.
    """

    def __init__(
        self,
        tokens_per_expert: torch.Tensor,
        requested_per_expert: torch.Tensor,
        probs_TE: torch.Tensor,
        kept_token_A: torch.Tensor | None = None,
    ) -> None:
        self.tokens_per_expert = tokens_per_expert.detach()
        self.requested_per_expert = requested_per_expert.detach()
        # source token of every kept assignment, grouped by expert (the dispatch order)
        self.kept_token_A = None if kept_token_A is None else kept_token_A.detach()
        self.num_tokens = int(probs_TE.shape[0])  # T of the forward
        # the entropy is computed when first asked for: most steps never read it
        self._probs_TE: torch.Tensor | None = probs_TE.detach()
        self._entropy: torch.Tensor | None = None

    @property
    def dropped_fraction(self) -> float:
        requested = int(self.requested_per_expert.sum())
        return 0.0 if requested == 0 else 1.0 - int(self.tokens_per_expert.sum()) / requested

    @property
    def entropy(self) -> float:
        if self._entropy is None:
            with torch.no_grad():
                p = self._probs_TE.float()
                entropy_T = -(p * torch.log(p.clamp_min(1e-30))).sum(dim=-1)
                self._entropy = entropy_T.mean() if entropy_T.numel() else entropy_T.new_zeros(())
            self._probs_TE = None
        return float(self._entropy)

    @property
    def load_cv(self) -> float:
        load = self.requested_per_expert.float()
        mean = load.mean()
        return 0.0 if float(mean) == 0 else float(load.std(correction=0) / mean)

    @property
    def dead_experts(self) -> int:
        """Experts that processed no assignment in this forward."""
        return int((self.tokens_per_expert == 0).sum())

    def affinity(self, labels_T: torch.Tensor, num_labels: int) -> torch.Tensor:
        """(num_labels, E) counts: how many kept assignments of tokens with each label each
        expert processed. ``labels_T`` gives one label per token of the forward."""
        if self.kept_token_A is None:
            raise ValueError("this RoutingStats has no per-assignment record (kept_token_A)")
        E = self.tokens_per_expert.numel()
        expert_A = torch.repeat_interleave(
            torch.arange(E, device=self.tokens_per_expert.device), self.tokens_per_expert
        )
        label_A = labels_T.to(self.kept_token_A.device)[self.kept_token_A]
        flat = label_A * E + expert_A
        return torch.bincount(flat, minlength=num_labels * E).view(num_labels, E)

    def as_dict(self) -> dict[str, object]:
        return {
            "tokens_per_expert": self.tokens_per_expert.tolist(),
            "dropped_fraction": self.dropped_fraction,
            "entropy": self.entropy,
            "load_cv": self.load_cv,
            "dead_experts": self.dead_experts,
        }

    def __repr__(self) -> str:
        return (
            f"RoutingStats(tokens_per_expert={self.tokens_per_expert.tolist()}, "
            f"dropped_fraction={self.dropped_fraction:.4f}, entropy={self.entropy:.4f}, "
            f"load_cv={self.load_cv:.4f})"
        )
