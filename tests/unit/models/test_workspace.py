"""The shared global workspace (Goyal et al. 2022, §2) against slow references written here."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import moesaic as ms
from moesaic.models.workspace import (
    SharedWorkspace,
    WorkspaceConfig,
    WorkspaceTransformer,
    attention_baseline,
    workspace_moe_tiny,
)

B, S, D, M, H = 2, 7, 16, 3, 2  # S, M and D differ, so a (S, S) tensor cannot pass for another


def _workspace(**kw) -> SharedWorkspace:
    ws = SharedWorkspace(D, n_heads=H, **{"num_slots": M, "top_k": 2, **kw}).double()
    with torch.no_grad():  # move every parameter off its init (identity slots, unit norms, ...)
        for p in ws.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return ws


def _layer_norm(x: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    mean = sum(x.tolist()) / len(x)
    var = sum((v - mean) ** 2 for v in x.tolist()) / len(x)
    return (x - mean) / math.sqrt(var + norm.eps) * norm.weight + norm.bias


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return torch.tensor([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x.tolist()]).double()


def _sigmoid(x: torch.Tensor) -> torch.Tensor:
    return torch.tensor([1 / (1 + math.exp(-v)) for v in x.tolist()]).double()


def reference_write(ws: SharedWorkspace, h: torch.Tensor, memory: torch.Tensor):
    """One write step from the formulas, one batch row, head, slot and position at a time:
    (unmasked softmax probs (B, H, M, S), kept weights (B, H, M, S), new memory (B, M, D))."""
    hd = D // H
    Wq = ws.write_q.weight.detach().double()
    Wk, Wv = ws.write_kv.weight.detach().double().split(D)
    probs = torch.zeros(B, H, M, S, dtype=torch.float64)
    kept = torch.zeros(B, H, M, S, dtype=torch.float64)
    new = torch.zeros(B, M, D, dtype=torch.float64)
    for b in range(B):
        attended = torch.zeros(M, D, dtype=torch.float64)
        for head in range(H):
            rows = slice(head * hd, (head + 1) * hd)
            for j in range(M):
                q = Wq[rows] @ memory[b, j]
                scores = [float(q @ (Wk[rows] @ h[b, i])) / math.sqrt(hd) for i in range(S)]
                top = max(scores)
                z = sum(math.exp(s - top) for s in scores)
                p = [math.exp(s - top) / z for s in scores]
                keep = sorted(range(S), key=lambda i: -p[i])[: ws.top_k or S]
                total = sum(p[i] for i in keep) if ws.renormalize else 1.0
                for i in range(S):
                    probs[b, head, j, i] = p[i]
                for i in keep:
                    kept[b, head, j, i] = p[i] / total
                    attended[j, rows] += p[i] / total * (Wv[rows] @ h[b, i])
        for j in range(M):
            m = _layer_norm(memory[b, j] + attended[j], ws.norm1)
            mlp = ws.mlp.w2.weight @ _gelu(ws.mlp.w1.weight @ m)
            m = _layer_norm(m + mlp, ws.norm2)
            if ws.gate_input is not None:  # Santoro et al. 2018, eq. 7
                mean_h = sum(h[b, i] for i in range(S)) / S
                g = ws.gate_input.weight @ mean_h + ws.gate_input.bias
                g = g + ws.gate_memory.weight @ torch.tanh(memory[b, j])
                i_gate, f_gate = _sigmoid(g[:D]), _sigmoid(g[D:])
                m = i_gate * torch.tanh(m) + f_gate * memory[b, j]
            new[b, j] = m
    return probs, kept, new


@pytest.mark.parametrize("gate", [True, False])
@pytest.mark.parametrize("renormalize", [False, True])
def test_one_write_step_equals_the_loop_reference(gate, renormalize):
    ws = _workspace(gate=gate, renormalize=renormalize)
    h, memory = torch.randn(B, S, D, dtype=torch.float64), torch.randn(B, M, D).double()
    with torch.no_grad():
        new, weights = ws.write(h, memory)
        _, kept, ref = reference_write(ws, h, memory)
    torch.testing.assert_close(weights, kept)
    torch.testing.assert_close(new, ref)


def test_top_k_write_admits_exactly_k_positions_per_slot_the_argmax_k_of_its_scores():
    ws = _workspace(top_k=3)
    h = torch.randn(B, S, D, dtype=torch.float64)
    with torch.no_grad():
        out = ws(h)
        probs, _, _ = reference_write(ws, h, ws.initial_state(B))
    w = out.write_weights  # (B, H, M, S)
    assert w.shape == (B, H, M, S)
    assert ((w != 0).sum(-1) == 3).all() and ((w == 0).sum(-1) == S - 3).all()
    for row_w, row_p in zip(w.reshape(-1, S), probs.reshape(-1, S)):
        winners = set(torch.nonzero(row_w).flatten().tolist())
        assert winners == set(sorted(range(S), key=lambda i: -row_p[i])[:3])
        # softmax is monotone, so its argmax-k is the scores'; not renormalised (the released
        # code): the kept weights are the softmax's own
        torch.testing.assert_close(row_w[list(winners)], row_p[list(winners)])


def test_soft_workspace_equals_top_k_of_every_position():
    soft = _workspace(top_k=None)
    h = torch.randn(B, S, D, dtype=torch.float64)
    for renormalize in (False, True):
        every = SharedWorkspace(D, M, S, H, renormalize=renormalize).double()
        every.load_state_dict(soft.state_dict())
        with torch.no_grad():
            a, b = soft(h), every(h)
        torch.testing.assert_close(b.write_weights, a.write_weights)
        torch.testing.assert_close(b.memory, a.memory)
        torch.testing.assert_close(b.read, a.read)


def test_with_one_slot_and_top_1_every_position_reads_the_same_value():
    ws = _workspace(num_slots=1, top_k=1)
    with torch.no_grad():
        out = ws(torch.randn(B, S, D, dtype=torch.float64))
    assert ((out.write_weights != 0).sum(-1) == 1).all()
    assert torch.equal(out.read_weights, torch.ones(B, H, S, 1, dtype=torch.float64))
    torch.testing.assert_close(out.read, out.read[:, :1].expand(B, S, D))


def test_permuting_positions_permutes_the_reads_and_leaves_the_workspace_unchanged():
    ws = _workspace(top_k=3)
    h = torch.randn(B, S, D, dtype=torch.float64)
    perm = torch.randperm(S)
    with torch.no_grad():
        out, out_p = ws(h), ws(h[:, perm])
    torch.testing.assert_close(out_p.memory, out.memory)
    torch.testing.assert_close(out_p.read, out.read[:, perm])
    torch.testing.assert_close(out_p.write_weights, out.write_weights[..., perm])
    torch.testing.assert_close(out_p.read_weights, out.read_weights[:, :, perm])


def _features_config(**kw) -> WorkspaceConfig:
    fields = dict(
        vocab_size=None, d_in=5, num_classes=4, max_seq_len=S, d_model=D, n_layers=2, n_heads=H,
        d_ff=24, num_slots=M, top_k=2,
    )  # fmt: skip
    return WorkspaceConfig(**{**fields, **kw})


@pytest.mark.parametrize("share_layers", [True, False])
def test_broadcast_reaches_every_position_when_the_workspace_replaces_attention(share_layers):
    # mode="replace" has no attention: the workspace is the only path between positions
    model = WorkspaceTransformer(_features_config(mode="replace", share_layers=share_layers))
    x = torch.randn(1, S, 5, requires_grad=True)
    out = model.features(x)
    probe = torch.randn(D)  # the sum of a LayerNorm's output is constant: project instead
    for i in range(S):
        (grad,) = torch.autograd.grad(out[0, i] @ probe, x, retain_graph=True)
        assert (grad[0].abs().sum(-1) > 0).all(), f"position {i} misses some input"


class _ShapeLog(TorchDispatchMode):
    """Records the shape of every tensor every operator returns."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.shapes += [tuple(t.shape) for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out


def test_scores_are_slots_by_positions_and_positions_by_slots_never_positions_squared():
    model = WorkspaceTransformer(_features_config(share_layers=False))
    seen = []

    def hook(module, args, out):
        seen.append((out.write_weights.shape, out.read_weights.shape))

    for block in model.blocks:
        block.workspace.register_forward_hook(hook)
    x = torch.randn(B, S, 5)
    with _ShapeLog() as log:
        model(x).sum().backward()
    assert seen == [((B, H, M, S), (B, H, S, M))] * 2
    assert (B, H, M, S) in log.shapes and (B, H, S, M) in log.shapes
    assert not [s for s in log.shapes if s[-2:] == (S, S)], "a (S, S) tensor was built"


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"top_k": 0}, "top_k=0 must be >= 1"),
        ({"num_slots": 0}, "num_slots=0 must be >= 1"),
        ({"mode": "pairwise"}, "mode='pairwise' is not one of"),
        ({"n_heads": 3}, "d_model=64 must be divisible by n_heads=3"),
        ({"top_k": 65}, "top_k=65 must be <= max_seq_len=64"),
        ({"d_in": 8}, "vocab_size=16, d_in=8: set exactly one"),
        ({"dropout": 1.0}, "dropout=1.0 must be < 1"),
        ({"slot_d_ff": 0}, "slot_d_ff=0 must be >= 1"),
        ({"activation": "tanh"}, "activation='tanh' is not one of"),
        ({"moe": ms.MoEConfig(num_experts=4, d_model=32)}, "moe.d_model=32 conflicts"),
    ],
)
def test_bad_config_values_are_value_errors_naming_the_field(fields, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        WorkspaceConfig(**fields)


def test_bad_workspace_arguments_are_value_errors_naming_the_argument():
    with pytest.raises(ValueError, match="d_model=10 must be divisible by n_heads=3"):
        SharedWorkspace(10, num_slots=2, n_heads=3)
    with pytest.raises(ValueError, match="top_k=0 must be >= 1"):
        SharedWorkspace(16, top_k=0)
    with pytest.raises(ValueError, match=r"memory.shape=\(2, 4, 16\) must be"):
        SharedWorkspace(16, num_slots=3)(torch.randn(2, 5, 16), torch.randn(2, 4, 16))


def test_attention_baseline_has_the_workspace_models_parameter_count():
    for cfg in (WorkspaceConfig(), workspace_moe_tiny()):
        base = attention_baseline(cfg)
        n_ws = sum(p.numel() for p in WorkspaceTransformer(cfg).parameters())
        n_att = sum(p.numel() for p in WorkspaceTransformer(base).parameters())
        experts = cfg.moe.num_experts if cfg.moe else 1
        assert base.mode == "attention" and base.d_ff > cfg.d_ff
        assert abs(n_att - n_ws) <= experts * 2 * cfg.d_model  # one FFN unit of each expert


def test_shared_layers_hold_one_blocks_parameters_and_run_it_n_layers_times():
    shared = WorkspaceTransformer(_features_config(n_layers=3))
    unshared = WorkspaceTransformer(_features_config(n_layers=3, share_layers=False))
    assert len(shared.blocks) == 1 and len(unshared.blocks) == 3
    # later unshared layers continue the first one's workspace: no learned slots of their own
    assert [b.workspace.slots is not None for b in unshared.blocks] == [True, False, False]
    calls = []
    shared.blocks[0].workspace.register_forward_hook(lambda *a: calls.append(1))
    shared(torch.randn(B, S, 5))
    assert len(calls) == 3


def test_token_model_with_moe_ffn_trains_and_its_state_dict_round_trips():
    model = WorkspaceTransformer(workspace_moe_tiny())
    x = torch.randint(0, 16, (B, 12))
    loss = model(x).logsumexp(-1).mean() + ms.aux_loss(model)
    loss.backward()
    assert model.blocks[0].ffn.experts.w1.grad is not None
    copy = WorkspaceTransformer(workspace_moe_tiny())
    copy.load_state_dict(model.state_dict())
    model.eval(), copy.eval()
    torch.testing.assert_close(copy(x), model(x))
    with pytest.raises(ValueError, match="must be token ids"):
        model(torch.randn(B, 12))
