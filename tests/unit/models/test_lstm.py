"""The LSTM-MoE (Shazeer et al. 2017): its gate is the noisy top-k formula and its output the
gated sum of the experts, recomputed by hand on real LSTM states; the MoE sees each timestep
alone; one expert with k=1 is the dense model; the dense twin has the MoE model's activated
FLOPs; ``count`` books each LSTM weight matrix once per token; sampling recomputes the prefix;
bad config values name their field."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moesaic as ms
from moesaic.config import MoEConfig
from moesaic.context import current_context
from moesaic.inference.generate import generate_ids
from moesaic.metrics import count
from moesaic.metrics.flop_counter import measure_flops
from moesaic.models.lstm import LSTMConfig, LSTMMoE
from moesaic.train.recipes import dense_baseline, get_recipe

E, K = 6, 2


def _cfg(**fields) -> LSTMConfig:
    moe = MoEConfig(num_experts=E, top_k=K, router="noisy_topk", expert_backend="torch")
    return LSTMConfig(**{"vocab_size": 40, "d_model": 12, "d_ff": 10, "moe": moe, **fields})


def _model(**fields) -> LSTMMoE:
    torch.manual_seed(0)
    model = LSTMMoE(_cfg(**fields))
    for layer in model.moe_layers():  # the paper's zero init routes uniformly: make it choose
        nn.init.normal_(layer.router.gate.weight, std=0.5)
        nn.init.normal_(layer.router.noise.weight, std=0.5)
    return model


def _states(model: LSTMMoE, idx_BS: torch.Tensor) -> torch.Tensor:
    """What the first MoE reads: the embedding plus the first LSTM's output (dropout 0)."""
    x_BSD = model.embed(idx_BS)
    return x_BSD + model.lstms[0](x_BSD)[0]


def _noisy_topk_by_hand(layer: ms.MoE, x_TD: torch.Tensor, seed: int):
    """(gates (T, E), output (T, D)) of Shazeer et al. 2017, eqs. 3-5, one token and one expert
    at a time: H = x W_g + eps * softplus(x W_noise), G = softmax(KeepTopK(H, k)),
    y = sum_i G_i E_i(x) with E_i(x) = relu(x w1_i) w2_i."""
    T, D = x_TD.shape
    torch.manual_seed(seed)
    eps_TE = torch.randn(T, E)  # what the router's randn_like draws after the same seed
    w_g, w_noise = layer.router.gate.weight, layer.router.noise.weight  # (E, D)
    w1, w2 = layer.experts.w1, layer.experts.w2  # (E, D, F), (E, F, D)
    gates_TE, y_TD = torch.zeros(T, E), torch.zeros(T, D)
    for t in range(T):
        h_E = x_TD[t] @ w_g.T + eps_TE[t] * F.softplus(x_TD[t] @ w_noise.T)
        kept = h_E.topk(K).indices
        keep_topk_E = torch.full((E,), float("-inf")).scatter(0, kept, h_E[kept])
        gates_TE[t] = keep_topk_E.softmax(dim=0)
        for i in range(E):
            if gates_TE[t, i] > 0:
                y_TD[t] += gates_TE[t, i] * (torch.relu(x_TD[t] @ w1[i]) @ w2[i])
    return gates_TE, y_TD


@torch.no_grad()
def test_the_gate_is_noisy_topk_and_the_output_the_gated_sum_of_experts_on_lstm_states():
    model = _model().train()
    idx_BS = torch.randint(0, 40, (3, 7), generator=torch.Generator().manual_seed(1))
    x_BSD = _states(model, idx_BS)
    (layer,) = model.moe_layers()
    gates_TE, y_TD = _noisy_topk_by_hand(layer, x_BSD.reshape(-1, 12), seed=5)
    assert ((gates_TE > 0).sum(dim=1) == K).all()
    torch.manual_seed(5)
    assert torch.allclose(layer(x_BSD), y_TD.view(3, 7, 12), atol=1e-6)
    torch.manual_seed(5)
    routing = layer.router(x_BSD.reshape(-1, 12), current_context())
    assert torch.allclose(routing.probs_TE, gates_TE, atol=1e-6)
    # the whole model: sigmoid(MoE) added to the states, the second LSTM, the tied projection
    x_BSD = x_BSD + torch.sigmoid(y_TD.view(3, 7, 12))
    x_BSD = x_BSD + model.lstms[1](x_BSD)[0]
    torch.manual_seed(5)  # the LSTMs draw no random numbers: the router's noise is the same
    assert torch.allclose(model(idx_BS), x_BSD @ model.embed.weight.T, atol=1e-5)


@torch.no_grad()
def test_the_moe_sees_each_timestep_alone():
    model = _model().eval()  # no noise: a token's route is a function of its state alone
    idx_BS = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(2))
    x_BSD = _states(model, idx_BS)
    (layer,) = model.moe_layers()
    y_BSD = layer(x_BSD)
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(layer(x_BSD[:, perm]), y_BSD[:, perm], atol=1e-6)
    assert torch.allclose(layer(x_BSD[:, 4:]), y_BSD[:, 4:], atol=1e-6)  # shifted in time
    for t in range(9):
        assert torch.allclose(layer(x_BSD[:, t : t + 1]), y_BSD[:, t : t + 1], atol=1e-6)
    changed = x_BSD.clone()
    changed[:, 5] += 1.0
    moved = (layer(changed) - y_BSD).abs().amax(dim=(0, 2))
    assert moved[5] > 0 and (moved[torch.arange(9) != 5] == 0).all()


def test_one_expert_with_k1_equals_the_dense_model_with_the_same_weights():
    one = MoEConfig(num_experts=1, top_k=1, router="noisy_topk", expert_backend="torch")
    torch.manual_seed(0)
    sparse = LSTMMoE(_cfg(moe=one)).train()
    dense = LSTMMoE(sparse.cfg.dense_equivalent()).train()
    assert dense.cfg.matched_d_ff == 10 and not dense.moe_layers()
    weights = {k: v for k, v in sparse.state_dict().items() if ".experts." not in k}
    weights = {k: v for k, v in weights.items() if ".router." not in k}
    weights["ffns.0.w1.weight"] = sparse.ffns[0].experts.w1[0].T
    weights["ffns.0.w2.weight"] = sparse.ffns[0].experts.w2[0].T
    dense.load_state_dict(weights)
    idx_BS = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(4))
    targets_BS = torch.roll(idx_BS, -1, dims=1)
    loss_s, loss_d = sparse.loss(idx_BS, targets_BS), dense.loss(idx_BS, targets_BS)
    assert torch.allclose(loss_s, loss_d, atol=1e-6)
    loss_s.backward()
    loss_d.backward()
    grads = dict(dense.named_parameters())
    for name, p in sparse.named_parameters():
        if name in grads:
            assert torch.allclose(p.grad, grads[name].grad, atol=1e-6), name
    experts = sparse.ffns[0].experts
    assert torch.allclose(experts.w1.grad[0].T, dense.ffns[0].w1.weight.grad, atol=1e-6)
    assert torch.allclose(experts.w2.grad[0].T, dense.ffns[0].w2.weight.grad, atol=1e-6)


def test_the_dense_twin_has_the_activated_flops_of_the_moe_model_less_its_router():
    sparse = ms.models.create("lstm-moe-tiny")
    dense = ms.models.create("lstm-dense-tiny")
    cfg = sparse.cfg
    assert dense.cfg == cfg.dense_equivalent() and dense.cfg.matched_d_ff == 2 * 384
    c_sparse, c_dense = count(sparse), count(dense)
    gates = 2 * 2 * cfg.d_model * cfg.moe.num_experts  # noisy_topk: W_g and W_noise
    assert c_sparse.forward_flops - c_dense.forward_flops == gates
    assert c_sparse.activated_params - c_dense.activated_params == gates / 2
    # the registry sizes it to the Transformer MoE LM's FLOPs per token at 256-token windows
    lm = count(ms.models.create("lm-moe-tiny"), seq_len=256)
    assert c_sparse.forward_flops == lm.forward_flops


def test_count_books_each_lstm_weight_matrix_once_per_token():
    torch.manual_seed(0)
    I, H, B, S = 5, 7, 2, 4
    lstm = nn.LSTM(I, H, batch_first=True)
    x_BSI = torch.randn(B, S, I)
    w_ih, w_hh, b_ih, b_hh = lstm.weight_ih_l0, lstm.weight_hh_l0, lstm.bias_ih_l0, lstm.bias_hh_l0

    def by_hand(x_BSI):  # the LSTM equations, one timestep at a time
        h, c, out = torch.zeros(B, H), torch.zeros(B, H), []
        for t in range(S):
            i, f, g, o = (F.linear(x_BSI[:, t], w_ih, b_ih) + F.linear(h, w_hh, b_hh)).chunk(4, 1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            out.append(h)
        return torch.stack(out, dim=1)

    with torch.no_grad():
        assert torch.allclose(by_hand(x_BSI), lstm(x_BSI)[0], atol=1e-6)
    per_token = 2 * 4 * H * (I + H)
    assert count(lstm).forward_flops == per_token
    assert measure_flops(by_hand, x_BSI) == B * S * per_token
    # torch's counter has no formula for the fused LSTM kernel; if it gains one, it must agree
    assert measure_flops(lstm, x_BSI) in (0, B * S * per_token)


def test_count_agrees_with_the_flop_counter_on_everything_but_the_lstms():
    model = _model().train()  # training: the noise gate runs too, as count books it
    B, S, D = 3, 5, 12
    idx_BS = torch.randint(0, 40, (B, S), generator=torch.Generator().manual_seed(6))
    lstms = sum(count(lstm).forward_flops for lstm in model.lstms)
    assert lstms == 2 * 2 * 4 * D * (D + D)
    assert measure_flops(model, idx_BS) == B * S * (count(model).forward_flops - lstms)


def test_sampling_recomputes_the_prefix_of_a_model_without_a_kv_cache():
    model = _model().eval()
    prompt = [3, 1, 4]
    ids = generate_ids(model, prompt, 5, temperature=0)
    expected = list(prompt)
    with torch.no_grad():
        for _ in range(5):
            expected.append(int(model(torch.tensor([expected]))[0, -1].argmax()))
    assert ids == expected[3:]
    assert model.training is False


def test_loss_is_the_mean_cross_entropy_and_checks_its_targets():
    model = _model()
    idx_BS = torch.randint(0, 40, (2, 5))
    targets_BS = torch.randint(0, 40, (2, 5))
    torch.manual_seed(0)
    loss = model.loss(idx_BS, targets_BS)
    torch.manual_seed(0)
    logits_BSV = model(idx_BS)
    assert torch.allclose(loss, F.cross_entropy(logits_BSV.reshape(10, 40), targets_BS.view(10)))
    with pytest.raises(ValueError, match=r"targets.shape=\(2, 4\) must equal idx.shape"):
        model.loss(idx_BS, targets_BS[:, :4])
    with pytest.raises(ValueError, match="token ids must be in"):
        model(torch.full((1, 2), 40))


def test_the_models_are_registered_and_exported():
    assert ms.models.LSTMMoE is LSTMMoE and ms.models.LSTMConfig is LSTMConfig
    model = ms.models.create("lstm-moe-tiny")
    (layer,) = model.moe_layers()
    assert (layer.num_experts, layer.top_k, type(layer.router).__name__) == (
        16,
        2,
        "NoisyTopKRouter",
    )
    assert model.head.weight is model.embed.weight  # tied
    assert LSTMConfig() == model.cfg  # the defaults are the CPU-scale paper model


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"vocab_size": 0}, "vocab_size=0 must be >= 1"),
        ({"d_model": 0}, "d_model=0 must be >= 1"),
        ({"n_layers": 1}, "n_layers=1 must be >= 2 (the MoE sits between stacked LSTM layers)"),
        ({"d_ff": -3}, "d_ff=-3 must be >= 1"),
        ({"activation": "tanh"}, "activation='tanh' is not one of"),
        ({"dropout": 1.0}, "dropout=1.0 must be < 1"),
        ({"tie_embeddings": "yes"}, "tie_embeddings='yes' must be a bool"),
        ({"matched_d_ff": 20}, "matched_d_ff=20 is for dense models (moe=None)"),
        ({"moe": "noisy"}, "moe='noisy' must be an ms.MoEConfig or None"),
        ({"moe": MoEConfig(num_experts=4, d_ff=99)}, "moe.d_ff=99 conflicts with d_ff=384"),
    ],
)
def test_bad_config_values_name_the_field(fields, message):
    with pytest.raises((TypeError, ValueError)) as err:
        LSTMConfig(**fields)
    assert message in str(err.value)


def test_the_dense_baseline_of_an_lstm_recipe_is_its_dense_twin():
    sparse, dense = get_recipe("lstm-moe"), get_recipe("lstm-dense")
    assert dense_baseline(sparse) == dataclasses.replace(dense, recipe="lstm-moe-dense")
    assert dense.lstm == sparse.lstm.dense_equivalent() and dense.data == sparse.data
    assert sparse.data == get_recipe("lm-moe-tiny").data  # the same batches as the Transformer
