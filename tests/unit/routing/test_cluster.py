import pytest
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


@pytest.fixture
def one_thread():
    """Tiny problems: one thread is fastest, and on a shared 2-core machine much faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
def test_balanced_kmeans_gives_every_cluster_its_share_where_plain_kmeans_starves_one():
    # 300 samples in one tight blob and 20 far away: plain k-means with 4 centroids puts one
    # centroid on the small blob; balanced k-means gives each cluster 80 samples.
    torch.manual_seed(0)
    x = torch.cat([torch.randn(300, 2), torch.randn(20, 2) + 50.0])
    plain = ms.ROUTERS["cluster"](2, 4).fit(x, seed=0)
    counts = torch.bincount(plain.assign(x), minlength=4)
    assert counts.min() <= 20
    even = ms.ROUTERS["cluster"](2, 4).fit(x, seed=0, balanced=True)
    assert torch.bincount(even.assign(x, balanced=True), minlength=4).tolist() == [80] * 4
    # with N mod E left over, those few go to their nearest centroid
    extra = torch.bincount(even.assign(x[:319], balanced=True), minlength=4)
    assert extra.sum() == 319 and extra.min() >= 319 // 4


@pytest.mark.usefixtures("one_thread")
def test_kmeans_plus_plus_puts_one_centroid_in_each_far_apart_blob_for_every_seed():
    g = torch.Generator().manual_seed(1)
    centers = torch.tensor([[20.0, 0], [-20, 0], [0, 20], [0, -20]])
    x = centers[torch.arange(200) % 4] + torch.randn(200, 2, generator=g)
    for seed in range(10):
        router = ms.ROUTERS["cluster"](2, 4).fit(x, iters=1, seed=seed, init="kmeans++")
        nearest_blob = torch.cdist(router.centroids, centers).argmin(1)
        assert sorted(nearest_blob.tolist()) == [0, 1, 2, 3]
