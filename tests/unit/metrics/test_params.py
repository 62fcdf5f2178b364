import moesaic as ms
from moesaic.metrics import count_parameters


def test_activated_parameters_count_k_of_E_experts():
    # D=8, F=16, E=4, k=2: experts 4 * (8*16 + 16*8) = 1024, gate 8*4 = 32
    layer = ms.MoE(8, 16, 4, router="topk", top_k=2)
    count = count_parameters(layer)
    assert count.total == 1024 + 32
    assert count.activated == 32 + 1024 * 2 / 4


def test_lm_total_counts_tied_embeddings_once():
    model = ms.models.create("lm-moe-test")
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert count_parameters(model).total == total
    dense = ms.models.create("lm-moe-test", moe=None)
    assert count_parameters(dense).activated == count_parameters(dense).total
