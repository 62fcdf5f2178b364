"""Distillation loss and weight schedule against hand-worked values and Hinton et al.'s limit."""

import math

import pytest
import torch

from moesaic.train.distill import distill_loss, kd_weight


def test_hand_worked_two_classes():
    # teacher logits (0, ln 3) -> p = (1/4, 3/4); student logits (0, 0) -> q = (1/2, 1/2)
    teacher = torch.tensor([[0.0, math.log(3.0)]])
    student = torch.zeros(1, 2)
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert distill_loss(student, teacher).item() == pytest.approx(expected, rel=1e-6)
    # at T=2 the softened teacher is (1/(1+sqrt 3), sqrt 3/(1+sqrt 3)); times T^2 = 4
    p1 = 1 / (1 + math.sqrt(3.0))
    p2 = 1 - p1
    expected_t2 = 4 * (p1 * math.log(p1 / 0.5) + p2 * math.log(p2 / 0.5))
    assert distill_loss(student, teacher, 2.0).item() == pytest.approx(expected_t2, rel=1e-6)


def test_equal_models_score_zero_and_mask_drops_rows():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 5, generator=g)
    assert distill_loss(z, z, 3.0).item() == pytest.approx(0.0, abs=1e-6)
    teacher = torch.randn(6, 5, generator=g)
    mask = torch.tensor([True, False, True, False, False, True])
    masked = distill_loss(z, teacher, 2.0, mask=mask)
    kept = distill_loss(z[mask], teacher[mask], 2.0)
    assert masked.item() == pytest.approx(kept.item(), rel=1e-6)


def test_high_temperature_gradient_is_logit_matching():
    # Hinton et al. 2015, eq. 3: T^2 * dC/dz -> (z - v) / N for zero-mean logits as T grows
    g = torch.Generator().manual_seed(1)
    z = torch.randn(10, generator=g)
    v = torch.randn(10, generator=g)
    z, v = z - z.mean(), v - v.mean()
    z.requires_grad_(True)
    loss = distill_loss(z[None], v[None], 20.0)
    (grad,) = torch.autograd.grad(loss, z)
    limit = (z.detach() - v) / 10
    assert ((grad - limit).norm() / limit.norm()).item() < 0.05


def test_teacher_gets_no_gradient_and_shapes_must_match():
    teacher = torch.randn(3, 4, requires_grad=True)
    student = torch.randn(3, 4, requires_grad=True)
    distill_loss(student, teacher, 2.0).backward()
    assert teacher.grad is None and student.grad is not None
    with pytest.raises(ValueError, match="same output classes"):
        distill_loss(torch.zeros(2, 4), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="temperature"):
        distill_loss(torch.zeros(2, 4), torch.zeros(2, 4), 0.0)


def test_weight_schedules():
    assert [kd_weight(s, 0.5, 3) for s in (1, 3, 4)] == [0.5, 0.5, 0.0]
    assert [kd_weight(s, 1.0, 4, "linear") for s in (1, 2, 4, 5)] == [1.0, 0.75, 0.25, 0.0]
    assert kd_weight(10_000, 0.3, 0) == 0.3
    with pytest.raises(ValueError, match="schedule"):
        kd_weight(1, 1.0, 2, "cosine")
