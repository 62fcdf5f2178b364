"""Every FFN pattern moefy recognises: converts, keeps the call signature, equals the dense model
at init when upcycled with a normalised router, and trains (forward and backward)."""

import copy

import pytest
import torch
import transformers
from torch import nn

import moesaic as ms
from moesaic.convert import FFNSpec, MoEFFN
from moesaic.models import create


class TimmMlp(nn.Module):
    """timm.layers.Mlp's structure and forward (timm is not a dependency)."""

    def __init__(self, d: int, f: int) -> None:
        super().__init__()
        self.fc1, self.act, self.drop1 = nn.Linear(d, f), nn.GELU(), nn.Dropout(0.0)
        self.norm, self.fc2, self.drop2 = nn.Identity(), nn.Linear(f, d), nn.Dropout(0.0)

    def forward(self, x):
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


class Block(nn.Module):
    def __init__(self, ffn: nn.Module, d: int) -> None:
        super().__init__()
        self.norm, self.ffn = nn.LayerNorm(d), ffn

    def forward(self, x):
        return x + self.ffn(self.norm(x))


class CustomFFN(nn.Module):
    """An FFN no built-in pattern knows: raw parameters, ReLU."""

    def __init__(self, d: int, f: int) -> None:
        super().__init__()
        self.up, self.down = (
            nn.Parameter(torch.randn(d, f) / d**0.5),
            nn.Parameter(torch.randn(f, d) / f**0.5),
        )

    def forward(self, x):
        return torch.relu(x @ self.up) @ self.down


def custom_match(name, module):
    if isinstance(module, CustomFFN):
        return FFNSpec(w1=module.up.detach(), w2=module.down.detach(), activation="relu")
    return None


def _ids():
    return torch.randint(0, 64, (2, 6))


def gpt2():
    cfg = transformers.GPT2Config(
        vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2, n_inner=48
    )
    return transformers.GPT2LMHeadModel(cfg), _ids()


def llama():
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=16,
    )
    return transformers.LlamaForCausalLM(cfg), _ids()


def bert():
    cfg = transformers.BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=16,
    )
    return transformers.BertModel(cfg), _ids()


# name -> (factory returning (model, input), FFNs found, moefy keyword arguments)
CASES = {
    "sequential": (
        lambda: (nn.Sequential(*(Block(_seq(), 8) for _ in range(2))), torch.randn(3, 5, 8)),
        2,
        {},
    ),
    "timm": (
        lambda: (nn.Sequential(*(Block(TimmMlp(8, 20), 8) for _ in range(2))), torch.randn(4, 8)),
        2,
        {},
    ),
    "gpt2": (gpt2, 2, {}),
    "llama": (llama, 2, {}),
    "bert": (bert, 2, {}),
    "moesaic-dense": (lambda: (create("lm-dense-tiny", n_layers=2), _ids()), 2, {}),
    "user-match": (
        lambda: (nn.Sequential(*(Block(CustomFFN(8, 12), 8) for _ in range(2))), torch.randn(5, 8)),
        2,
        {"match": custom_match},
    ),
}


def _seq():
    return nn.Sequential(nn.Linear(8, 24), nn.ReLU(), nn.Linear(24, 8))


def _out(model, x):
    out = model(x)
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_pattern_converts_equals_dense_at_init_and_trains(case):
    factory, n_ffns, kwargs = CASES[case]
    dense, x = factory()
    dense.eval()
    model = copy.deepcopy(dense)
    assert len(ms.convert.find_ffns(model, kwargs.get("match"))) == n_ffns
    ms.moefy(model, num_experts=3, router="topk", every=1, top_k=2, **kwargs)
    moes = [m for m in model.modules() if isinstance(m, ms.MoE)]
    assert len(moes) == n_ffns
    # upcycled + weights that sum to one per token: the dense model's output
    with torch.no_grad():
        torch.testing.assert_close(_out(model, x), _out(dense, x), atol=2e-5, rtol=1e-4)
    model.train()
    loss = _out(model, x).float().pow(2).mean() + ms.aux_loss(model)
    loss.backward()
    for moe in moes:
        assert moe.experts.w1.grad is not None and moe.experts.w1.grad.abs().sum() > 0
        assert moe.router.gate.weight.grad is not None
        assert moe.router.gate.weight.grad.abs().sum() > 0


def test_gpt2_keeps_its_residual_dropout_and_conv1d_biases():
    model, _ = gpt2()
    mlp = model.transformer.h[1].mlp
    ms.moefy(model, num_experts=2, every=2)
    new = model.transformer.h[1].mlp
    assert isinstance(new, MoEFFN) and new.dropout is mlp.dropout
    assert isinstance(model.transformer.h[0].mlp, type(mlp))  # every=2: the first stays dense
    torch.testing.assert_close(new.moe.experts.w1[1], mlp.c_fc.weight)  # Conv1D is (in, out)
    torch.testing.assert_close(new.moe.experts.b2[0], mlp.c_proj.bias)
    assert new.moe.experts.activation == "gelu_tanh"  # GPT-2's gelu_new


def test_bert_output_keeps_its_layernorm_and_signature():
    model, ids = bert()
    layer = model.encoder.layer[0]
    norm = layer.output.LayerNorm
    ms.moefy(model, num_experts=2, router="topk", every=1, top_k=1)
    assert isinstance(layer.intermediate, ms.convert.Passthrough)
    assert layer.output.LayerNorm is norm
    h, res = torch.randn(2, 3, 32), torch.randn(2, 3, 32)
    layer.output.eval()
    want = norm(layer.output.moe(h) + res)
    torch.testing.assert_close(layer.output(h, res), want)
