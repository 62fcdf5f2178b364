import torch

import moesaic as ms
from moesaic.routing.hash import balanced_hash
from tests.unit.routing._util import route


def test_hash_is_exactly_balanced_over_any_multiple_of_E_ids():
    for E in (2, 7, 8, 32):
        ids = torch.arange(E * 123)
        assert torch.bincount(balanced_hash(ids, E), minlength=E).tolist() == [123] * E


def test_hash_is_fixed_pseudo_random_and_seeded():
    ids = torch.arange(4000)
    a, b = balanced_hash(ids, 8), balanced_hash(ids, 8)
    assert torch.equal(a, b)
    assert not torch.equal(a, ids % 8)  # not the trivial modulo
    assert not torch.equal(a, balanced_hash(ids, 8, seed=1))


def test_hash_router_reads_token_ids_from_the_context_and_falls_back_to_position():
    layer = ms.MoE(8, 16, 4, router="hash")
    seen = []
    layer.router.register_forward_hook(lambda m, a, out: seen.append(out))
    ids = torch.tensor([[5, 5, 9], [9, 1, 5]])
    with ms.routing_context(token_ids=ids):
        layer(torch.randn(2, 3, 8))
    expert = seen[-1].expert
    assert expert[0] == expert[1] == expert[5] and expert[2] == expert[3]
    torch.testing.assert_close(expert, balanced_hash(ids.flatten(), 4))
    layer(torch.randn(2, 3, 8))
    torch.testing.assert_close(seen[-1].expert, balanced_hash(torch.arange(6), 4))
    assert list(layer.router.parameters()) == []


def test_hash_top2_uses_distinct_experts_with_half_weight():
    router = ms.ROUTERS["hash"](8, 4, 2)
    r = route(router, torch.randn(10, 8))
    assert (r.expert[:10] != r.expert[10:]).all()
    assert torch.equal(r.weight, torch.full((20,), 0.5))


def test_hash_token_id_count_mismatch_is_an_error():
    import pytest

    layer = ms.MoE(8, 16, 4, router="hash")
    with ms.routing_context(token_ids=torch.arange(5)), pytest.raises(ValueError, match="T=6"):
        layer(torch.randn(6, 8))
