"""Image training pieces: augmentation, the resumable sampler (equal to an uninterrupted one and
split exactly between ranks), SimCLR's loss against a loop, the ViT's dense twin, the config."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moesaic.metrics import count
from moesaic.models import create
from moesaic.models.vit import ViTConfig
from moesaic.train.config import (
    ConfigError,
    RunConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
)
from moesaic.train.recipes import get_recipe
from moesaic.train.vision import ImageSampler, augment, nt_xent


def _images(n=12, size=10):
    return torch.arange(n * size * size, dtype=torch.float32).view(n, 1, size, size)


@pytest.mark.parametrize("mode", ["crop", "crop+flip"])
def test_augmentation_is_a_window_of_the_padded_image(mode):
    x = _images()
    out = augment(x, mode, torch.Generator().manual_seed(0))
    padded = F.pad(x, (1, 1, 1, 1))  # 10x10 images: one pixel of padding
    flips = 0
    for i in range(len(x)):
        windows = [padded[i, :, a : a + 10, b : b + 10] for a in range(3) for b in range(3)]
        plain = any(torch.equal(out[i], w) for w in windows)
        mirrored = any(torch.equal(out[i], w.flip(-1)) for w in windows)
        assert plain or (mode == "crop+flip" and mirrored)
        flips += not plain
    assert mode == "crop" or 0 < flips < len(x)
    again = augment(x, mode, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    assert torch.equal(augment(x, "none", torch.Generator()), x)


def _sampler(**kw):
    x = _images(n=10)
    y = torch.arange(10) % 3
    return ImageSampler(x, y, batch_size=4, seed=3, mode="crop+flip", **kw)


def test_sampler_resumes_and_splits_between_ranks_exactly():
    full = _sampler()
    straight = [full.next_batch() for _ in range(7)]  # crosses two epochs
    part = _sampler()
    for _ in range(3):
        part.next_batch()
    resumed = _sampler()
    resumed.load_state_dict(part.state_dict())
    for a, b in zip(straight[3:], [resumed.next_batch() for _ in range(4)]):
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    ranks = [_sampler(rank=r, world_size=2) for r in range(2)]
    for a in straight:
        halves = [s.next_batch() for s in ranks]
        assert torch.equal(torch.cat([h.x for h in halves]), a.x)
        assert torch.equal(torch.cat([h.y for h in halves]), a.y)


def test_two_views_are_different_augmentations_of_the_same_images():
    s = _sampler(views=2)
    b = s.next_batch()
    assert b.x2 is not None and b.x.shape == b.x2.shape and not torch.equal(b.x, b.x2)
    # the same centre pixels (a crop moves by at most one pixel, a flip mirrors)
    assert torch.equal(b.x.sum((1, 2, 3)) > 0, b.x2.sum((1, 2, 3)) > 0)


def test_nt_xent_equals_the_loop_over_views():
    torch.manual_seed(0)
    z1, z2, tau = torch.randn(5, 7), torch.randn(5, 7), 0.3
    loss, acc = nt_xent(z1, z2, tau)
    z = F.normalize(torch.cat([z1, z2]), dim=-1)
    terms, hits = [], 0
    for i in range(10):
        j = (i + 5) % 10
        others = [k for k in range(10) if k != i]
        sims = {k: float(z[i] @ z[k]) / tau for k in others}
        denominator = sum(math.exp(s) for s in sims.values())
        terms.append(-math.log(math.exp(sims[j]) / denominator))
        hits += max(sims, key=sims.get) == j
    assert loss.item() == pytest.approx(sum(terms) / 10, rel=1e-5)
    assert acc.item() == pytest.approx(hits / 10)


def test_the_dense_vit_has_the_vmoe_models_activated_flops_per_patch():
    moe, dense = create("vmoe-tiny"), create("vit-tiny")
    a, b = count(moe), count(dense)
    # the gate (2 * D * E per patch) is the only extra activated work of the MoE model
    gate = 2 * 64 * 8 * sum(ViTConfig.sites(create("vmoe-tiny").cfg))
    assert a.forward_flops == b.forward_flops + gate
    assert a.total_params > 2 * b.total_params


def test_image_recipes_round_trip_and_name_bad_fields():
    for name in ("vmoe-fashion", "vit-fashion", "sparse-mlp-fashion", "mixer-fashion"):
        cfg = get_recipe(name)
        assert config_from_dict(RunConfig, config_to_dict(cfg)) == cfg
    cfg = apply_overrides(get_recipe("vmoe-fashion"), ["vision.vit.moe.num_experts=16"])
    assert cfg.vision.vit.moe.num_experts == 16
    with pytest.raises(ConfigError, match=r"vision\.vit\.patch_size=5 must divide"):
        apply_overrides(get_recipe("vmoe-fashion"), ["vision.vit.patch_size=5"])
    with pytest.raises(
        ConfigError, match=r"vision\.mixer\.rerep_patches=98 and rerep_channels=0 must"
    ):
        apply_overrides(get_recipe("sparse-mlp-fashion"), ["vision.mixer.rerep_channels=0"])
    with pytest.raises(ConfigError, match="exactly one of vision.vit"):
        apply_overrides(get_recipe("vmoe-fashion"), ["vision.mixer.n_layers=2"])
    with pytest.raises(ConfigError, match="vision.dataset='cifar'"):
        apply_overrides(get_recipe("vmoe-fashion"), ["vision.dataset=cifar"])


def test_each_dense_recipe_costs_its_moe_recipes_flops():
    sparse = get_recipe("sparse-mlp-fashion").vision.mixer
    dense = get_recipe("mixer-fashion").vision.mixer
    assert sum(sparse.stage_flops().values()) == sum(dense.stage_flops().values())
    assert (
        get_recipe("vit-fashion").vision.vit
        == get_recipe("vmoe-fashion").vision.vit.dense_equivalent()
    )
