"""Auxiliary router losses, unweighted (the MoE layer applies ``aux_loss_weight``).

Shape legend (docs/shapes.md): T tokens, E experts.
"""

from __future__ import annotations

import torch

__all__ = ["balance_loss", "cv_squared", "z_loss"]


def balance_loss(probs_TE: torch.Tensor, first_choice_T: torch.Tensor) -> torch.Tensor:
    """Switch / GShard load-balancing loss ``E * sum_i f_i * P_i``.

    Switch Transformer eq. 4 (Fedus et al. 2021); GShard's ``l_aux`` scaled by E^2 as in lingvo.
    ``f_i`` is the fraction of tokens whose first choice is expert i (not differentiable) and
    ``P_i`` the mean router probability of expert i. Uniform routing gives exactly 1.
    """
    T, E = probs_TE.shape
    f_E = torch.bincount(first_choice_T, minlength=E).to(probs_TE.dtype) / T
    P_E = probs_TE.mean(dim=0)
    return E * torch.dot(f_E, P_E)


def cv_squared(v_E: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Squared coefficient of variation ``var / mean^2`` (population variance).

    Shazeer et al. 2017, eqs. 6-7 and 11. Written as var/mean^2 rather than (std/mean)^2 so the
    gradient is defined (zero) at perfectly uniform load, as in tensor2tensor and vmoe.
    """
    v_E = v_E.float() if not v_E.dtype.is_floating_point else v_E
    if v_E.numel() < 2:
        return v_E.new_zeros(())
    return v_E.var(correction=0) / (v_E.mean().square() + eps)


def z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """Router z-loss (ST-MoE, Zoph et al. 2022, eq. 5): mean over tokens of logsumexp(logits)^2."""
    return torch.logsumexp(logits_TE, dim=-1).square().mean()
