"""Knowledge distillation: the one implementation every distilling feature shares.

Hinton, Vinyals & Dean (2015, §2): the student matches the teacher's softened distribution
``softmax(z / T)``; the soft term is multiplied by ``T**2`` so that its gradient keeps the same
size as the hard-label term's when ``T`` changes. Users: mixture-of-students and staged KD
(Rajbhandari et al. 2022, §5), knowledge inheritance (Zhang et al. 2021, CPM-2 §3), the classic
mixtures' specialists and students (Hinton et al. 2015, §5).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["distill_loss", "kd_weight"]


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    *,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``T**2 * KL(softmax(teacher / T) || softmax(student / T))``, averaged over rows.

    Args:
        student_logits: ``(..., C)`` logits of the model being trained.
        teacher_logits: ``(..., C)`` logits of the teacher (no gradient flows into them).
        temperature: ``T > 0``; 1 is plain distribution matching.
        mask: optional boolean ``(...)``: only these rows count (padding, ignored positions).

    The KL divergence differs from the cross-entropy with soft targets only by the teacher's
    entropy, a constant for the student: the gradients are the same, and a student equal to its
    teacher scores exactly 0.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in shape: the two models need the same "
            f"output classes (vocabulary)"
        )
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)) or (
        temperature <= 0
    ):
        raise ValueError(f"temperature={temperature!r} must be a finite number > 0")
    c = student_logits.shape[-1]
    log_q = F.log_softmax(student_logits.reshape(-1, c).float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.detach().reshape(-1, c).float() / temperature, dim=-1)
    per_row = (log_p.exp() * (log_p - log_q)).sum(-1)
    if mask is not None:
        keep = mask.reshape(-1).to(per_row.device, torch.bool)
        per_row = per_row[keep]
    if per_row.numel() == 0:
        return student_logits.sum() * 0.0
    return per_row.mean() * temperature**2


def kd_weight(step: int, weight: float, until: int, schedule: str = "constant") -> float:
    """The distillation term's weight at (1-based) ``step``.

    ``constant``: ``weight`` up to ``until``, then 0 (staged KD, Rajbhandari et al. 2022, §5.2).
    ``linear``: from ``weight`` down to 0 at ``until`` (knowledge inheritance, CPM-2 §3: the
    teacher's share shrinks as the student outgrows it). ``until <= 0`` keeps the term forever.
    """
    if schedule not in ("constant", "linear"):
        raise ValueError(f"schedule={schedule!r} must be 'constant' or 'linear'")
    if until <= 0:
        return weight
    if step > until:
        return 0.0
    if schedule == "constant":
        return weight
    return weight * (1.0 - (step - 1) / until)
