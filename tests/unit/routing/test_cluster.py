import torch

import moesaic as ms
from tests.unit.routing._util import route


def test_kmeans_recovers_separated_blobs_and_routes_each_to_one_expert():
    torch.manual_seed(0)
    centers = torch.tensor([[10.0, 0], [-10, 0], [0, 10], [0, -10]])
    label = torch.arange(400) % 4
    x = centers[label] + torch.randn(400, 2)
    router = ms.ROUTERS["cluster"](2, 4).fit(x, seed=0)
    r = route(router, x)
    for blob in range(4):
        assert r.expert[label == blob].unique().numel() == 1
    assert r.expert.unique().numel() == 4
    again = ms.ROUTERS["cluster"](2, 4).fit(x, seed=0)
    torch.testing.assert_close(router.centroids, again.centroids)


def test_cluster_router_has_no_gradient_path_and_no_aux_loss():
    router = ms.ROUTERS["cluster"](4, 3)
    r = route(router, torch.randn(10, 4, requires_grad=True))
    assert not r.weight.requires_grad and r.aux_loss.item() == 0.0
    assert "centroids" in router.state_dict()
