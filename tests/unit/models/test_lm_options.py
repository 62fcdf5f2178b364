"""LMConfig's norm / rope_theta options (added for Mixtral interop; defaults unchanged)."""

import pytest
import torch
from torch import nn

from moesaic.models.lm import LMConfig, MoELM

SMALL = {"vocab_size": 20, "max_seq_len": 8, "d_model": 16, "n_layers": 1, "n_heads": 2, "d_ff": 8}


def test_defaults_are_layernorm_and_base_10000():
    model = MoELM(LMConfig(**SMALL))
    assert isinstance(model.ln_f, nn.LayerNorm) and model.cfg.rope_theta == 10000.0


def test_rmsnorm_option_normalises_by_the_root_mean_square():
    model = MoELM(LMConfig(**SMALL, norm="rmsnorm", norm_eps=1e-6))
    x = torch.randn(3, 16)
    want = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)  # weight starts at one
    torch.testing.assert_close(model.ln_f(x), want)
    assert all(isinstance(b.ln1, nn.RMSNorm) for b in model.blocks)


def test_rope_theta_sets_the_rotation_frequencies():
    model = MoELM(LMConfig(**SMALL, rope_theta=100.0))
    hd = 8
    # position 1, channel pair i turns by 100^(-2i/hd)
    want = torch.cos(100.0 ** (-torch.arange(0, hd, 2).float() / hd))
    torch.testing.assert_close(model.rope_cos[1], want)


@pytest.mark.parametrize(
    "field, value, text",
    [
        ("norm", "batchnorm", "model.norm='batchnorm' is not one of"),
        ("rope_theta", 0.0, "model.rope_theta=0.0 must be > 0"),
        ("norm_eps", -1.0, "model.norm_eps=-1.0 must be a finite float >= 0"),
    ],
)
def test_bad_options_are_rejected_by_name(field, value, text):
    with pytest.raises(ValueError, match=text.replace("(", r"\(").replace(".", r"\.")):
        LMConfig(**SMALL, **{field: value})
