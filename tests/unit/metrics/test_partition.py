import math

import torch

from moesaic.metrics.partition import class_expert_table, normalized_mutual_info


def _nmi_by_hand(labels, experts):
    """The textbook sums over every (class, expert) pair, one example at a time."""
    n = len(labels)
    classes, groups = sorted(set(labels)), sorted(set(experts))
    pc = {c: labels.count(c) / n for c in classes}
    pe = {e: experts.count(e) / n for e in groups}
    mi = 0.0
    for c in classes:
        for e in groups:
            joint = sum(1 for a, b in zip(labels, experts) if a == c and b == e) / n
            if joint:
                mi += joint * math.log(joint / (pc[c] * pe[e]))
    hc = -sum(p * math.log(p) for p in pc.values())
    he = -sum(p * math.log(p) for p in pe.values())
    return 2 * mi / (hc + he)


def test_nmi_is_one_for_a_class_aligned_split_zero_for_an_independent_one_and_matches_the_sums():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    assert normalized_mutual_info(class_expert_table(labels, labels, 3, 3)) == 1.0
    # every class spread evenly over two experts: the expert tells nothing
    independent = class_expert_table(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1]), 2, 2)
    assert abs(normalized_mutual_info(independent)) < 1e-12
    g = torch.Generator().manual_seed(0)
    y, e = torch.randint(0, 5, (200,), generator=g), torch.randint(0, 3, (200,), generator=g)
    e[y < 2] = 0  # some dependence
    table = class_expert_table(y, e, 5, 3)
    assert (
        table.sum() == 200
        and table[0, 1] == 0
        and table.tolist()[4] == [int(((y == 4) & (e == k)).sum()) for k in range(3)]
    )
    nmi = normalized_mutual_info(table)
    assert abs(nmi - _nmi_by_hand(y.tolist(), e.tolist())) < 1e-9 and 0.05 < nmi < 1.0
