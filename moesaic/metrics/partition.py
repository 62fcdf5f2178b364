"""How cleanly a routing partitions the classes: the class-by-expert table and its normalised
mutual information (NMI).

``NMI = I(class; expert) / ((H(class) + H(expert)) / 2)`` (the arithmetic-mean normalisation,
scikit-learn's default): 1 when the experts split the data exactly along class lines
(each class on one expert, each expert one class), 0 when the expert says nothing of the class.
"""

from __future__ import annotations

import torch

__all__ = ["class_expert_table", "normalized_mutual_info"]


def class_expert_table(
    label_N: torch.Tensor, expert_N: torch.Tensor, C: int, E: int
) -> torch.Tensor:
    """Counts (C, E): how many examples of each class each expert received."""
    return torch.bincount(label_N.long() * E + expert_N.long(), minlength=C * E).view(C, E)


def normalized_mutual_info(table_CE: torch.Tensor) -> float:
    """NMI of the joint distribution given by a contingency table of counts (in [0, 1])."""
    p = table_CE.double() / table_CE.sum()
    pc, pe = p.sum(1), p.sum(0)
    mi = (torch.xlogy(p, p) - torch.xlogy(p, pc[:, None] * pe[None, :])).sum()
    hc, he = -torch.xlogy(pc, pc).sum(), -torch.xlogy(pe, pe).sum()
    if hc + he <= 0:
        return 1.0  # one class on one expert: the partition is trivially exact
    return float((2 * mi / (hc + he)).clamp(0.0, 1.0))
