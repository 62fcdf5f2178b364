import re

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

import moesaic as ms
from moesaic.layer import MoE
from moesaic.models.mixer import MixerConfig, MixerModel

# 8x8 images in 2x2 patches: S = 16 patches; D = 12 channels per patch (S != D, so a mix-up of
# the two axes changes shapes or values)
S, D = 16, 12


def _moe(top_k: int = 1, **kw) -> ms.MoEConfig:
    return ms.MoEConfig(num_experts=4, router="topk", top_k=top_k, **kw)


def _cfg(**kw) -> MixerConfig:
    base = dict(image_size=8, patch_size=2, d_model=D, n_layers=1, token_d_ff=8, d_ff=16)
    return MixerConfig(**(base | kw))


def test_token_moe_routes_the_channel_rows_of_each_image():
    torch.manual_seed(0)
    cfg = _cfg(token_moe=_moe())
    token_mix = MixerModel(cfg).blocks[0].token_mix.eval()
    reference = MoE(cfg.token_moe_config()).eval()
    reference.load_state_dict(token_mix.mlp.state_dict())
    B = 3
    x = torch.randn(B, S, D)
    # by hand: row (b, c) is channel c of image b across its S patches
    rows = torch.stack([x[b, :, c] for b in range(B) for c in range(D)])
    out = reference(rows)
    want = torch.empty_like(x)
    for b in range(B):
        for c in range(D):
            want[b, :, c] = out[b * D + c]
    torch.testing.assert_close(token_mix(x), want)
    # B * D tokens of length S were routed, one expert each (top_k=1)
    assert token_mix.mlp.d_model == S
    assert int(token_mix.mlp.last_stats.tokens_per_expert.sum()) == B * D * 1


def test_dense_block_is_the_mlp_mixer_formula():
    torch.manual_seed(0)
    block = MixerModel(_cfg()).blocks[0]
    x = torch.randn(2, S, D)
    tok, ch = block.token_mix.mlp, block.channel_mix
    h = F.layer_norm(x, (D,), block.ln1.weight, block.ln1.bias).transpose(1, 2)  # (B, D, S)
    x1 = x + (F.gelu(h @ tok.w1.weight.T) @ tok.w2.weight.T).transpose(1, 2)
    h = F.layer_norm(x1, (D,), block.ln2.weight, block.ln2.bias)
    want = x1 + F.gelu(h @ ch.w1.weight.T) @ ch.w2.weight.T
    torch.testing.assert_close(block(x), want)


def test_identity_rerep_layers_with_zeroed_experts_leave_only_the_channel_branch():
    torch.manual_seed(0)
    cfg = _cfg(token_moe=_moe(), rerep_patches=S, rerep_channels=D)
    block = MixerModel(cfg).blocks[0].eval()
    mix = block.token_mix
    x = torch.randn(2, S, D)
    ch = block.channel_mix
    h = F.layer_norm(x, (D,), block.ln2.weight, block.ln2.bias)
    want = x + F.gelu(h @ ch.w1.weight.T) @ ch.w2.weight.T
    assert not torch.allclose(block(x), want)  # the token branch adds something until zeroed
    with torch.no_grad():
        for layer in (mix.to_channels, mix.to_patches, mix.from_patches, mix.from_channels):
            layer.weight.copy_(torch.eye(*layer.weight.shape))
            layer.bias.zero_()
        mix.mlp.experts.w2.zero_()
    torch.testing.assert_close(block(x), want)


def _set_inverse_pair(into: nn.Linear, back: nn.Linear) -> None:
    """Make ``back(into(v)) == v``: ``into(v) = W v + b`` with W (m, n), m >= n, of full column
    rank; ``back(u) = W^+ (u - b)``."""
    W, b = torch.randn_like(into.weight), torch.randn_like(into.bias)
    pinv = torch.linalg.pinv(W)
    with torch.no_grad():
        into.weight.copy_(W)
        into.bias.copy_(b)
        back.weight.copy_(pinv)
        back.bias.copy_(-pinv @ b)


def test_rerep_layers_set_to_inverse_maps_round_trip_the_table():
    torch.manual_seed(0)
    cfg = _cfg(token_moe=_moe(), rerep_patches=2 * S, rerep_channels=2 * D)
    mix = MixerModel(cfg).double().blocks[0].token_mix
    _set_inverse_pair(mix.to_channels, mix.from_channels)
    _set_inverse_pair(mix.to_patches, mix.from_patches)
    seen = []
    mix.mlp = nn.Identity()
    mix.mlp.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    x = torch.randn(3, S, D, dtype=torch.float64)
    torch.testing.assert_close(mix(x), x)
    assert seen == [(3, 2 * D, 2 * S)]  # the inner MLP saw B x C' rows of length S'


def test_rerep_to_longer_fewer_rows_routes_b_times_c_prime_tokens_of_length_s_prime():
    torch.manual_seed(0)
    cfg = _cfg(token_moe=_moe(top_k=2), rerep_patches=2 * S, rerep_channels=D // 2)
    model = MixerModel(cfg).eval()
    B = 3
    model(torch.randn(B, 1, 8, 8))
    (moe_s,) = model.moe_layers()
    assert moe_s.d_model == 2 * S
    assert moe_s.last_stats.num_tokens == B * (D // 2)
    assert int(moe_s.last_stats.tokens_per_expert.sum()) == B * (D // 2) * 2
    # S' * C' = S * C: MoE_s does the work it does without re-represent layers, which add
    # Linear(12, 6) and back on 16 patches (2 * 2 * 16 * 12 * 6) and Linear(16, 32) and back on
    # 6 rows (2 * 2 * 6 * 16 * 32)
    plain = _cfg(token_moe=_moe(top_k=2)).stage_flops()
    flops = cfg.stage_flops()
    assert flops["token_moe"] == plain["token_moe"]
    assert flops["rerep"] == 4 * 16 * 12 * 6 + 4 * 6 * 16 * 32 == 16_896


def test_dense_equivalent_matches_the_activated_expert_flops():
    cfg = _cfg(
        n_layers=3,
        moe_last=2,
        moe=_moe(top_k=2, shared_d_ff=4),
        token_moe=_moe(top_k=2),
    )
    dense = cfg.dense_equivalent()
    assert dense.matched_token_d_ff == 2 * 8  # top-2 doubles the width
    assert dense.matched_d_ff == 2 * 16 + 4
    model = MixerModel(dense)
    assert not model.moe_layers()
    assert [b.token_mix.mlp.w1.out_features for b in model.blocks] == [8, 16, 16]
    assert [b.channel_mix.w1.out_features for b in model.blocks] == [16, 36, 36]
    sparse, matched = cfg.stage_flops(), dense.stage_flops()
    assert matched["token_moe"] == matched["channel_moe"] == 0
    assert sparse["token_mlp"] + sparse["token_moe"] == matched["token_mlp"]
    assert sparse["channel_mlp"] + sparse["channel_moe"] == matched["channel_mlp"]
    # 2 sparse blocks x 16 patches x (12 -> 36 -> 12) x 2 FLOPs per multiply-add
    assert sparse["channel_moe"] == 2 * 16 * (12 * 36 + 36 * 12) * 2 == 55_296
    # 2 sparse blocks x 12 rows x (16 -> 16 -> 16) x 2
    assert sparse["token_moe"] == 2 * 12 * (16 * 16 + 16 * 16) * 2 == 24_576


def test_stage_flops_agree_with_torch_flop_counter():
    torch.manual_seed(0)
    moe = _moe(top_k=2, expert_backend="torch")  # plain products the counter sees
    cfg = _cfg(n_layers=2, moe_last=1, moe=moe, token_moe=moe, rerep_patches=32, rerep_channels=6)
    B = 2
    for model_cfg, E in ((cfg.dense_equivalent(), 0), (cfg, 4)):
        model = MixerModel(model_cfg).eval()
        with FlopCounterMode(display=False) as counter:
            model(torch.randn(B, 1, 8, 8))
        # the routers' gates, Linear(32, 4) on 6 rows and Linear(12, 4) on 16 patches, are
        # the one product stage_flops leaves out
        routers = 2 * (6 * 32 + 16 * 12) * E
        assert counter.get_total_flops() == B * (sum(model_cfg.stage_flops().values()) + routers)


def test_forward_backward_reaches_every_parameter():
    torch.manual_seed(0)
    cfg = MixerConfig(
        image_size=8,
        patch_size=2,
        d_model=16,
        n_layers=2,
        token_d_ff=16,
        d_ff=32,
        moe_last=1,
        moe=_moe(top_k=2),
        token_moe=_moe(top_k=2),
    )
    model = MixerModel(cfg).train()
    block = model.blocks[1]
    assert model.moe_layers() == [block.token_mix.mlp, block.channel_mix]
    images, labels = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    assert model.embed(images).shape == (4, 16)
    logits = model(images)
    assert logits.shape == (4, 10)
    assert torch.isfinite(logits).all()
    aux = ms.aux_loss(model)
    assert aux > 0
    (F.cross_entropy(logits, labels) + aux).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert any("router" in name for name, _ in model.named_parameters())


def test_images_of_the_wrong_size_are_refused():
    model = MixerModel(_cfg())
    with pytest.raises(ValueError, match=re.escape("images.shape=(2, 1, 10, 10)")):
        model(torch.randn(2, 1, 10, 10))


@pytest.mark.parametrize(
    "fields,named",
    [
        (dict(patch_size=3), "patch_size=3"),
        (dict(token_d_ff=0), "token_d_ff=0"),
        (dict(rerep_patches=32, token_moe=_moe()), "rerep_channels=0"),
        (dict(rerep_patches=32, rerep_channels=6), "token_moe"),
        (dict(matched_d_ff=64, moe=_moe()), "matched_d_ff=64"),
        (dict(matched_token_d_ff=64, token_moe=_moe()), "matched_token_d_ff=64"),
        (dict(token_moe=_moe(d_model=D)), "token_moe.d_model=12"),
        (dict(token_moe=_moe(d_ff=9)), "token_moe.d_ff=9 conflicts with token_d_ff"),
        (dict(moe=_moe(d_model=S)), "moe.d_model=16 conflicts with d_model=12"),
        (dict(moe=_moe(), moe_every=2), "moe_every=2"),
    ],
)
def test_bad_config_values_are_refused_naming_the_field(fields, named):
    with pytest.raises(ValueError, match=re.escape(named)):
        _cfg(**fields)
