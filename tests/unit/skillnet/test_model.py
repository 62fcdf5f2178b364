import pytest
import torch

import moesaic as ms
from moesaic.routing.task import SkillRouter
from moesaic.skillnet import task_loss
from moesaic.skillnet.model import MODALITIES, SkillNet, SkillNetConfig
from moesaic.skillnet.parts import SkillLinear

D, F, L = 16, 24, 2
SMALL = dict(d_model=D, n_layers=L, n_heads=2, d_ff=F, proj_dim=8, text_len=16, code_len=16,
             image_size=8, image_patch=4, video_frames=4, video_size=8, video_patch=4,
             sound_frames=8, n_mels=4)  # fmt: skip


def _model(**kw) -> SkillNet:
    return SkillNet(SkillNetConfig(**SMALL, **kw))


def _batch(task: str, B: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    inputs = {
        "text": torch.randint(1, 256, (B, 16), generator=g),
        "code": torch.randint(1, 256, (B, 16), generator=g),
        "image": torch.randint(0, 256, (B, 8, 8), generator=g),
        "video": torch.randint(0, 256, (B, 4, 8, 8), generator=g),
        "sound": torch.randn(B, 8, 4, generator=g),
    }
    spec = SkillNetConfig().tasks[task]
    if isinstance(spec[1], int):
        return {"inputs": inputs[spec[0]], "labels": torch.randint(0, spec[1], (B,), generator=g)}
    return {"query": inputs[spec[0]], "item": inputs[spec[1]]}


def _skill_slices(model: SkillNet):
    """(name, skill id, tensor slice of that skill's parameters' grads) over every skill site."""
    for name, m in model.named_modules():
        if isinstance(m, ms.MoE) and m.num_experts > 1:
            for e in range(m.num_experts):
                yield name, e, [m.experts.w1.grad[e], m.experts.w2.grad[e]]
        if isinstance(m, SkillLinear) and m.weight.shape[0] > 1:
            for e in range(m.weight.shape[0]):
                yield name, e, [m.weight.grad[e], m.bias.grad[e]]


@pytest.mark.parametrize("general", [False, True])
@pytest.mark.parametrize("task", sorted(SkillNetConfig().tasks))
def test_gradients_reach_only_the_active_skills(task, general):
    model = _model(skill_sites={"ffn", "attn_qkv"}, general_skill=general)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    task_loss(model, task, _batch(task)).backward()
    modalities = model.cfg.task_modalities(task)
    active = {MODALITIES.index(m) for m in modalities} | ({5} if general else set())
    sites = 0
    for name, e, grads in _skill_slices(model):
        sites += 1
        if e in active:
            assert any(bool(g.abs().sum() > 0) for g in grads), f"{name} skill {e} got no grad"
        else:
            assert all(bool((g == 0).all()) for g in grads), f"{name} inactive skill {e} has grad"
    assert sites == 2 * L * len(model.cfg.skills)  # two sites per layer, every skill checked
    for m, fe in model.frontends.items():
        touched = any(bool(p.grad.abs().sum() > 0) for p in fe.parameters())
        assert touched == (m in modalities), m
    for other, head in model.heads.items():
        assert any(bool(p.grad.abs().sum() > 0) for p in head.parameters()) == (other == task)


def test_skill_sites_use_the_skill_router():
    model = _model(skill_sites={"ffn", "attn_qkv"})
    for block in model.blocks:
        assert isinstance(block.ffn.router, ms.ROUTERS["skill"])
        assert isinstance(block.qkv.router, SkillRouter)
        assert block.ffn.router.task_skills == [[0], [1], [2], [3], [4]]


def test_parameter_counts_of_both_skill_sites_match_the_hand_count():
    dense = sum(p.numel() for p in _model(skill_sites=set()).parameters())
    ffn_site = 2 * D * F  # w1 (D, F) + w2 (F, D), no biases, per skill per layer
    qkv_site = D * 3 * D + 3 * D  # weight (D, 3D) + bias (3D)
    extra = 5 - 1  # five skills where the dense model has one shared copy
    cases = {
        frozenset({"ffn"}): dense + extra * ffn_site * L,
        frozenset({"attn_qkv"}): dense + extra * qkv_site * L,
        frozenset({"ffn", "attn_qkv"}): dense + extra * (ffn_site + qkv_site) * L,
    }
    for sites, expected in cases.items():
        assert sum(p.numel() for p in _model(skill_sites=sites).parameters()) == expected
    general = _model(skill_sites={"ffn", "attn_qkv"}, general_skill=True)
    assert sum(p.numel() for p in general.parameters()) == dense + 5 * (ffn_site + qkv_site) * L


@pytest.mark.parametrize("sites", [{"ffn"}, {"attn_qkv"}, {"ffn", "attn_qkv"}])
def test_every_input_activates_exactly_the_parameters_of_the_dense_model(sites):
    skill, dense = _model(skill_sites=sites), _model(skill_sites=set())
    site = ("ffn" in sites) * 2 * D * F + ("attn_qkv" in sites) * (3 * D * D + 3 * D)
    for task in skill.cfg.tasks:
        total, active = skill.parameter_counts(task)
        assert total > active
        # a classification input runs one skill; a retrieval pair runs the query's skill on
        # the query and the item's skill on the item: one copy of each site more in all
        pair = skill.cfg.task_kind(task) == "retrieve"
        assert active == dense.parameter_counts(task)[1] + pair * site * L
    # the general skill adds one more copy of each site to every task
    general = _model(skill_sites=sites, general_skill=True)
    assert (
        general.parameter_counts("text_cls")[1] == dense.parameter_counts("text_cls")[1] + site * L
    )


def test_inactive_skills_do_not_change_the_output():
    model = _model(skill_sites={"ffn", "attn_qkv"}).eval()
    x = _batch("text_cls")["inputs"]
    before = model.classify("text_cls", x)
    with torch.no_grad():
        for block in model.blocks:
            block.ffn.experts.w1[1:].normal_()
            block.qkv.weight[1:].normal_()
    assert torch.equal(model.classify("text_cls", x), before)
    with torch.no_grad():
        model.blocks[0].ffn.experts.w1[0].normal_()
    assert not torch.allclose(model.classify("text_cls", x), before)


def test_trailing_padding_does_not_change_a_text_embedding():
    model = _model().eval()
    x = _batch("text_cls")["inputs"][:, :10]
    x[1, 6:] = 0
    padded = torch.cat([x, torch.zeros(3, 6, dtype=x.dtype)], dim=1)
    torch.testing.assert_close(model.encode("text", padded), model.encode("text", x))


def test_registry_builds_skillnet_and_its_dense_baseline():
    assert isinstance(ms.models.create("skillnet-tiny"), SkillNet)
    dense = ms.models.create("skillnet-dense-tiny")
    assert dense.cfg.skill_sites == frozenset() and dense.blocks[0].ffn.num_experts == 1


def test_bad_config_is_rejected_with_the_field_name():
    with pytest.raises(ValueError, match=r"model.skill_sites\[\]='mlp'"):
        SkillNetConfig(skill_sites={"mlp"})
    with pytest.raises(ValueError, match=r"model.tasks\['x'\]"):
        SkillNetConfig(tasks={"x": ("smell", 3)})
    with pytest.raises(ValueError, match="modality='smell'"):
        _model().encode("smell", torch.zeros(1, 4))
    with pytest.raises(ValueError, match="retrieval task"):
        _model().classify("t2c", torch.zeros(1, 4))


def test_parameter_counts_agree_with_metrics_count_on_the_ffn_skills():
    model = _model(skill_sites={"ffn"})
    for task in ("text_cls", "sound_cls"):
        modality = model.cfg.tasks[task][0]
        counted = ms.metrics.count(model, task=MODALITIES.index(modality))
        idle_skills = counted.total_params - counted.activated_params  # other modalities' FFNs
        idle_frontends = sum(
            p.numel() for m, fe in model.frontends.items() if m != modality for p in fe.parameters()
        )
        idle_heads = sum(
            p.numel() for t, h in model.heads.items() if t != task for p in h.parameters()
        )
        total, active = model.parameter_counts(task)
        assert total == counted.total_params
        assert total - active == idle_skills + idle_frontends + idle_heads
