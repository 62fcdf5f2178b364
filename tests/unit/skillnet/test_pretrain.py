"""Sparse pretraining: each objective touches only its modality's skills; masking and the
reconstruction targets line up with the front-ends' tokens."""

import pytest
import torch

from moesaic.skillnet.pretrain import PretrainHeads, hide_tokens, masked_loss
from moesaic.skillnet.train import contrastive_loss
from tests.unit.skillnet.test_model import MODALITIES, _model, _skill_slices

INPUTS = {
    "text": lambda g: torch.randint(1, 256, (3, 16), generator=g),
    "code": lambda g: torch.randint(1, 256, (3, 16), generator=g),
    "image": lambda g: torch.randint(0, 256, (3, 8, 8), generator=g),
    "video": lambda g: torch.randint(0, 256, (3, 4, 8, 8), generator=g),
    "sound": lambda g: torch.randn(3, 8, 4, generator=g),
}


def _grads_by_skill(model, loss):
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    loss.backward()
    return {(name, e): any(bool(g.abs().sum() > 0) for g in grads)
            for name, e, grads in _skill_slices(model)}  # fmt: skip


@pytest.mark.parametrize("modality", MODALITIES)
def test_masked_prediction_trains_only_its_modality_skill(modality):
    model = _model(skill_sites={"ffn", "attn_qkv"})
    heads = PretrainHeads(model)
    torch.manual_seed(0)
    x = INPUTS[modality](torch.Generator().manual_seed(1))
    touched = _grads_by_skill(model, masked_loss(model, heads, modality, x))
    active = MODALITIES.index(modality)
    assert touched and all(t == (e == active) for (_, e), t in touched.items()), touched
    for m, fe in model.frontends.items():
        assert any(bool(p.grad.abs().sum() > 0) for p in fe.parameters()) == (m == modality)


def test_image_text_contrastive_trains_only_the_text_and_image_skills():
    model = _model(skill_sites={"ffn", "attn_qkv"})
    heads = PretrainHeads(model)
    g = torch.Generator().manual_seed(0)
    q = heads.pairs.query(model.encode("text", INPUTS["text"](g)))
    k = heads.pairs.item(model.encode("image", INPUTS["image"](g)))
    touched = _grads_by_skill(model, contrastive_loss(q, k, heads.pairs.scale()))
    on = {MODALITIES.index("text"), MODALITIES.index("image")}
    assert all(t == (e in on) for (_, e), t in touched.items()), touched


def test_hidden_tokens_keep_their_position_and_lose_their_content():
    model = _model().eval()
    g = torch.Generator().manual_seed(0)
    a, b = INPUTS["image"](g), INPUTS["image"](g)
    hide = torch.ones(3, 4, dtype=torch.bool)  # 8x8 images, 4x4 patches: 4 tokens
    ha, _ = model.encode_tokens("image", a, hide)
    hb, _ = model.encode_tokens("image", b, hide)
    torch.testing.assert_close(ha, hb)  # nothing of the pixels gets through
    assert not torch.allclose(ha[:, 0], ha[:, 1])  # but each token still knows where it is
    hide[:, 1:] = False
    hc, _ = model.encode_tokens("image", a, hide)
    assert not torch.allclose(hc, ha)
    with pytest.raises(ValueError, match="hide has shape"):
        model.encode_tokens("image", a, hide[:, :2])


def test_patch_targets_are_the_pixels_each_token_covers():
    model = _model()
    x = torch.arange(2 * 4 * 8 * 8).reshape(2, 4, 8, 8) % 256  # clips: 4 frames, tubelet 2
    t = model.frontends["video"].token_targets(x)
    assert t.shape == (2, 2 * 4, 2 * 16)
    # token 5 = time step 1 (frames 2, 3), patch 1 (row 0, column 1): pixels [0:4, 4:8]
    want = x[1, 2:4, 0:4, 4:8].float().div(255).reshape(-1)
    torch.testing.assert_close(t[1, 5], want)
    img = model.frontends["image"].token_targets(x[:, 0])
    torch.testing.assert_close(img[0, 2], x[0, 0, 4:8, 0:4].float().div(255).reshape(-1))


def test_sound_and_byte_targets_are_what_the_front_end_embeds():
    model = _model()
    fe = model.frontends["sound"]
    x = torch.randn(2, 8, 4)
    tokens, _ = fe(x)
    torch.testing.assert_close(tokens, fe.proj(fe.token_targets(x)) + fe.pos)
    text = torch.tensor([[5, 6, 0, 0], [7, 0, 0, 0]])
    assert model.frontends["text"].token_targets(text).tolist() == [[5, 6], [7, 0]]


def test_hide_tokens_hides_the_share_of_valid_tokens_only():
    torch.manual_seed(0)
    valid = torch.zeros(4, 20, dtype=torch.bool)
    for i, n in enumerate((20, 10, 3, 1)):
        valid[i, :n] = True
    hide = hide_tokens(valid, 0.5)
    assert hide.sum(1).tolist() == [10, 5, 2, 1]  # round(0.5 n), at least one
    assert not (hide & ~valid).any()
