import pytest
import torch

import moesaic as ms


def _layer(**kw):
    layer = ms.MoE(8, 16, 6, router="task", top_k=2, router_options={"num_tasks": 4}, **kw)
    seen = []
    layer.router.register_forward_hook(lambda m, a, out: seen.append(out))
    return layer, seen


def test_every_token_of_a_task_goes_to_the_same_experts():
    layer, seen = _layer()
    tasks = torch.tensor([0, 3, 0, 1])
    with ms.routing_context(task=tasks):
        layer(torch.randn(4, 7, 8))
    r = seen[-1]
    expert_TK = r.expert.view(2, 28).t()
    weight_TK = r.weight.view(2, 28).t()
    for b in range(len(tasks)):
        rows = slice(7 * b, 7 * b + 7)
        assert (expert_TK[rows] == expert_TK[7 * b]).all()
        assert torch.equal(weight_TK[rows], weight_TK[7 * b].expand(7, 2))
    assert torch.equal(expert_TK[0], expert_TK[14])  # tasks 0 and 0 agree


def test_task_gate_is_learned_through_the_task_embedding():
    layer, _ = _layer(aux_loss_weight=0.0)
    with ms.routing_context(task=2):
        layer(torch.randn(5, 8)).pow(2).sum().backward()
    grad = layer.router.task_embedding.weight.grad
    assert grad[2].abs().sum() > 0 and grad[[0, 1, 3]].abs().sum() == 0
    assert layer.router.gate.weight.grad.abs().sum() > 0


def test_task_ids_per_token_and_nested_contexts():
    layer, seen = _layer()
    with ms.routing_context(task=1):
        with ms.routing_context(task=torch.tensor([0, 1, 2, 3, 0, 1])):
            layer(torch.randn(6, 8))
        inner = seen[-1].expert
        layer(torch.randn(6, 8))
    outer = seen[-1].expert
    assert (outer[:6] == outer[0]).all()
    assert inner[0] == inner[4] and inner[1] == inner[5] == outer[0]


@pytest.mark.parametrize(
    "task,match",
    [
        (4, "task id 4 is out of range"),
        (-1, "task id -1 is out of range"),
        (torch.tensor([0, 9]), "task id 9"),
    ],
)
def test_out_of_range_task_ids_are_rejected(task, match):
    layer, _ = _layer()
    with ms.routing_context(task=task), pytest.raises(ValueError, match=match):
        layer(torch.randn(4, 8))


def test_missing_task_context_is_a_clear_error():
    layer, _ = _layer()
    with pytest.raises(ValueError, match=r"routing_context\(task=...\)"):
        layer(torch.randn(4, 8))


def test_skill_router_activates_exactly_the_tasks_skills_with_equal_weight():
    layer = ms.MoE(
        8, 16, 4, router="skill", router_options={"task_skills": [[0], [1, 3], [2, 0, 1]]}
    )
    seen = []
    layer.router.register_forward_hook(lambda m, a, out: seen.append(out))
    with ms.routing_context(task=torch.tensor([1, 2, 0])):
        layer(torch.randn(3, 2, 8)).sum().backward()
    r = seen[-1]
    got = {}
    for t, e, w in zip(r.token.tolist(), r.expert.tolist(), r.weight.tolist()):
        got.setdefault(t, {})[e] = w
    assert got[0] == got[1] == {1: 0.5, 3: 0.5}
    assert got[2] == got[3] == pytest.approx({2: 1 / 3, 0: 1 / 3, 1: 1 / 3})
    assert got[4] == got[5] == {0: 1.0}
    assert list(layer.router.parameters()) == []
    assert layer.aux_loss.item() == 0.0


@pytest.mark.parametrize(
    "skills,match",
    [
        ([[0], [4]], r"ints in \[0, 4\)"),
        ([[0, 0]], "distinct"),
        ([], "non-empty"),
        ([[]], "non-empty"),
    ],
)
def test_bad_skill_tables_are_rejected(skills, match):
    with pytest.raises(ValueError, match=match):
        ms.MoE(8, 16, 4, router="skill", router_options={"task_skills": skills})
