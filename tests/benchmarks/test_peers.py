"""benchmarks/peers.py runs and its dense limit computes the dense FFN (speed lives there)."""

import importlib.util

import pytest
import torch

from benchmarks.peers import BlockedDense, DenseFFN, OneDNNBlockedDense, main, paired


@pytest.mark.parametrize("family", ["gelu", "relu", "swiglu"])
def test_blocked_dense_equals_the_dense_ffn(family):
    torch.manual_seed(0)
    dense, blocked = DenseFFN(16, 48, family), BlockedDense(16, 48, family, block=7)
    blocked.load_state_dict(dense.state_dict())
    x = torch.randn(30, 16)
    torch.testing.assert_close(blocked(x), dense(x))


def test_peers_table_has_every_family_limit_and_names_missing_peers(capsys):
    args = "--tokens 64 --experts 4 --top-k 1 --d-model 16 --d-ff 32 --repeats 1 --peers"
    assert main([*args.split(), "transformers"]) == 0
    out = capsys.readouterr().out
    for row in ("| moesaic | ", "| naive | ", "| blocked-dense | ", "| dense | "):
        assert row in out
    assert "| 64 | 4 | 1 | fwd+bwd | 16 | " in out and "| 64 | 4 | 1 | fwd | 16 | " in out
    if importlib.util.find_spec("transformers") is None:
        assert "skipped transformers: not installed" in out
    else:
        for peer in ("mixtral-eager", "mixtral-grouped_mm", "qwen2-moe", "transformers-switch"):
            assert f"| {peer} | " in out


@pytest.mark.parametrize("family", ["gelu", "relu", "swiglu"])
def test_onednn_blocked_dense_equals_the_dense_ffn(family):
    torch.manual_seed(0)
    dense, blocked = DenseFFN(16, 48, family), OneDNNBlockedDense(16, 48, family, block=9)
    with torch.no_grad():
        blocked.ffn.w1.copy_(dense.w1.weight.t())
        blocked.ffn.w2.copy_(dense.w2.weight.t())
        if dense.w3 is not None:
            blocked.ffn.w3.copy_(dense.w3.weight.t())
    x = torch.randn(30, 16)
    torch.testing.assert_close(blocked(x), dense(x))


def test_peers_table_has_both_dense_limits_and_moesaic_on_torch_mm(capsys):
    args = "--tokens 64 --experts 4 --top-k 1 --d-model 16 --d-ff 32 --repeats 1 --peers"
    assert main(args.split()) == 0
    out = capsys.readouterr().out
    for row in ("| blocked-dense-onednn | ", "| moesaic-mm | "):
        assert row in out


def test_impls_keeps_the_named_rows_and_the_limits(capsys):
    args = "--tokens 64 --experts 4 --top-k 1 --d-model 16 --d-ff 32 --repeats 2 --peers"
    assert main([*args.split(), "--impls", "moesaic", "naive"]) == 0
    out = capsys.readouterr().out
    for row in ("| moesaic | ", "| naive | ", "| blocked-dense | ", "| blocked-dense-onednn | "):
        assert row in out
    for row in ("| moesaic-mm | ", "| dense | ", "| moesaic-onednn | "):
        assert row not in out


def test_impls_refuses_an_unknown_name(capsys):
    with pytest.raises(SystemExit) as err:
        main(["--impls", "moesaic", "fastmoe"])
    assert err.value.code == 2
    assert "--impls fastmoe: not an implementation" in capsys.readouterr().err


def test_paired_ratio_is_the_median_of_same_round_ratios():
    rounds = {"a": [1.0, 4.0, 3.0], "b": [2.0, 2.0, 1.0]}  # ratios 0.5, 2.0, 3.0
    assert paired(rounds, "a", "b") == 2.0
