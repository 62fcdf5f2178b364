import math

import pytest
import torch
from torch import nn

from moesaic.models.classic import (
    ClassicMoE,
    HardMoE,
    Specialist,
    combine_specialists,
    confusable_clusters,
    mile_loss,
    mlp,
    specialist_objective,
)
from moesaic.train.classic import (
    fit,
    train_dense,
    train_hard_moe,
    train_mile,
    train_specialists,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny: one thread is fastest, and on a shared 2-core machine a second
    thread only waits for the other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_mile_regression_loss_and_gradients_match_the_hand_worked_two_expert_case():
    # g = softmax(0, ln 3) = (1/4, 3/4); d = 1, o = (1, 3): squared errors 0 and 4.
    # E = -log(1/4 * 1 + 3/4 * e^-2) = -log(0.351501) = 1.045541
    # h = (0.25, 0.101501) / 0.351501 = (0.711235, 0.288765)
    # dE/do_i = -h_i (d - o_i) = (0, 0.577530); dE/du_i = -(h_i - g_i) = (-0.461235, 0.461235)
    u = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64, requires_grad=True)
    o = torch.tensor([[[1.0], [3.0]]], dtype=torch.float64, requires_grad=True)
    loss = mile_loss(u, o, torch.tensor([[1.0]], dtype=torch.float64), "regression")
    loss.backward()
    assert loss.item() == pytest.approx(1.045541, abs=1e-6)
    assert o.grad.flatten().tolist() == pytest.approx([0.0, 0.577530], abs=1e-6)
    assert u.grad.flatten().tolist() == pytest.approx([-0.461235, 0.461235], abs=1e-6)


def test_mile_classification_loss_is_minus_log_of_the_gated_class_probability():
    # g = (1/4, 3/4); expert 1 gives class 0 probability 1/2, expert 2 gives 1/10:
    # E = -log(1/4 * 1/2 + 3/4 * 1/10) = -log(0.2)
    u = torch.tensor([[0.0, math.log(3.0)]])
    o = torch.tensor([[[0.0, 0.0], [0.0, math.log(9.0)]]])
    loss = mile_loss(u, o, torch.tensor([0]), "classification")
    assert loss.item() == pytest.approx(-math.log(0.2), abs=1e-6)


def test_mile_gradients_equal_the_closed_forms_on_random_batches():
    g = torch.Generator().manual_seed(0)
    u = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    o = torch.randn(5, 3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    d = torch.randn(5, 2, generator=g, dtype=torch.float64)
    mile_loss(u, o, d, "regression").backward()
    with torch.no_grad():
        gate = u.softmax(-1)
        joint = gate * torch.exp(-0.5 * (d[:, None] - o).square().sum(-1))
        h = joint / joint.sum(-1, keepdim=True)
    torch.testing.assert_close(o.grad, -(h[..., None] * (d[:, None] - o)) / 5)
    torch.testing.assert_close(u.grad, -(h - gate) / 5)


def test_mile_experts_localise_on_two_regimes_where_each_regime_has_its_own_expert():
    # Masoudnia & Ebrahimpour (2014): y = 2x for x < 0 and y = -3x for x > 0, two linear
    # experts and a linear gate; the competitive loss gives each side its own expert.
    torch.manual_seed(0)
    x = torch.linspace(-1, 1, 400)[:, None]
    y = torch.where(x < 0, 2 * x, -3 * x)
    model = ClassicMoE(1, 1, 2, hidden=(), task="regression")
    train_mile(model, x, y, epochs=150, batch_size=50, lr=0.05, seed=0)
    gate = model(x)[0].softmax(-1)
    left, right = gate[x[:, 0] < 0].argmax(-1), gate[x[:, 0] > 0].argmax(-1)
    assert left.float().mean() in (0.0, 1.0) and right.float().mean() in (0.0, 1.0)
    assert left[0] != right[0]
    assert (gate.max(-1).values[x[:, 0].abs() > 0.1] > 0.9).float().mean() > 0.9
    mse = (model.predict(x) - y).square().mean().item()
    assert mse < 0.01


def test_classic_moe_takes_any_input_shape_that_flattens():
    model = ClassicMoE(12, 5, 3)
    x = torch.randn(4, 3, 2, 2)
    gate, out = model(x)
    assert gate.shape == (4, 3) and out.shape == (4, 3, 5)
    torch.testing.assert_close(model.predict(x).sum(-1), torch.ones(4))
    with pytest.raises(ValueError, match="task='ranking' is not one of"):
        ClassicMoE(12, 5, 3, task="ranking")
    with pytest.raises(ValueError, match="num_experts=0 must be >= 1"):
        ClassicMoE(12, 5, 0)


def _blobs(n_per: int = 60, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.tensor([[8.0, 0], [-8, 0], [0, 8], [0, -8]])
    label = torch.arange(4 * n_per) % 4
    x = centers[label] + torch.randn(4 * n_per, 2, generator=g)
    return x, (label * 2 + (x[:, 0] + x[:, 1] > 0).long()) % 3


def test_hard_moe_routes_to_the_nearest_centroid_and_trains_each_expert_on_its_cluster_only():
    x, y = _blobs()
    torch.manual_seed(0)
    model = HardMoE(nn.Identity(), [mlp(2, (8,), 3) for _ in range(4)], None, d_feature=2)
    seen = {e: [] for e in range(4)}
    hooks = [
        expert.register_forward_pre_hook(lambda m, args, e=e: seen[e].append(args[0].clone()))
        for e, expert in enumerate(model.experts)
    ]
    cluster = train_hard_moe(model, x, y, epochs=2, batch_size=16, seed=0)
    # the slow reference: every centroid's distance, one example at a time
    for i in range(len(x)):
        dists = [float(((x[i] - c) ** 2).sum()) for c in model.router.centroids]
        assert cluster[i] == dists.index(min(dists))
    assert torch.bincount(cluster, minlength=4).min() > 0
    for e in range(4):
        rows = {tuple(r.tolist()) for r in torch.cat(seen[e])}
        assert rows == {tuple(r.tolist()) for r in x[cluster == e]}
    for hook in hooks:
        hook.remove()
    test = torch.randn(50, 2) * 8
    assert torch.equal(model.assign(test), torch.cdist(test, model.router.centroids).argmin(1))
    with torch.no_grad():
        assert model(test[:0]).shape == (0, 3)
        out = model(test)
        for i in range(len(test)):
            e = int(model.assign(test[i : i + 1]))
            torch.testing.assert_close(out[i], model.experts[e](test[i]))


def test_hard_moe_from_dense_shares_one_decoder_that_expert_training_leaves_unchanged():
    torch.manual_seed(0)
    x, y = _blobs()
    dense = mlp(2, (8, 8), 3)
    model = HardMoE.from_dense(dense, num_experts=3, trunk_layers=2)
    decoder = model.decoder.weight.clone()
    train_hard_moe(model, x, y, epochs=1, batch_size=32, seed=0)
    assert torch.equal(model.decoder.weight, decoder)
    assert not torch.equal(model.experts[0][0].weight, model.experts[1][0].weight)


def test_parallel_expert_training_in_two_processes_equals_serial():
    x, y = _blobs(n_per=40)
    models = []
    for processes in (1, 2):
        torch.manual_seed(0)
        model = HardMoE.from_dense(mlp(2, (16, 16), 3), num_experts=4, trunk_layers=2)
        train_hard_moe(model, x, y, processes=processes, epochs=3, batch_size=16, seed=3)
        models.append(model)
    serial, parallel = (m.state_dict() for m in models)
    assert serial.keys() == parallel.keys()
    for k in serial:
        assert torch.equal(serial[k], parallel[k]), k
    untrained = HardMoE.from_dense(mlp(2, (16, 16), 3), num_experts=4, trunk_layers=2)
    assert not torch.equal(untrained.experts[0][0].weight, models[1].experts[0][0].weight)


def test_balanced_hard_moe_gives_every_expert_an_equal_share_of_the_training_set():
    x, y = _blobs(n_per=30)
    x = torch.cat([x, torch.randn(8, 2) * 0.1 + 40])  # a far-away speck of 8 examples
    y = torch.cat([y, torch.zeros(8, dtype=torch.long)])
    model = HardMoE(nn.Identity(), [mlp(2, (4,), 3) for _ in range(4)], None, d_feature=2)
    cluster = train_hard_moe(model, x, y, balanced=True, epochs=1, seed=0)
    assert torch.bincount(cluster, minlength=4).tolist() == [32] * 4


def _spec_case():
    # 6 classes, subsets {0, 1} and {2, 3}; the generalist hesitates between 0 and 1
    gen = torch.tensor([[2.0, 1.9, 0.5, 0.1, 0.0, -1.0]])
    subsets = [torch.tensor([0, 1]), torch.tensor([2, 3])]
    return gen, subsets


def test_specialist_combination_without_an_active_specialist_returns_the_generalist():
    gen, subsets = _spec_case()
    spec = [torch.tensor([[0.0, 5.0, 0.0]]), torch.tensor([[5.0, 0.0, 0.0]])]
    log_q, active = combine_specialists(gen, spec, subsets, top_n=1, steps=20)
    assert active.tolist() == [[1.0, 0.0]]
    far = torch.tensor([[0.0, 0.1, -1.0, -1.0, 3.0, 2.0]])  # top-2 classes 4, 5: no specialist
    log_q, active = combine_specialists(far, spec, subsets, top_n=2, steps=20)
    assert active.sum() == 0
    torch.testing.assert_close(log_q.exp(), far.softmax(-1))
    log_q, _ = combine_specialists(far, [], [], steps=5)
    torch.testing.assert_close(log_q.exp(), far.softmax(-1))


def test_confident_specialists_move_mass_to_the_true_class_and_descent_is_monotone():
    # PAPERS CPU check: one generalist, two specialists over disjoint subsets, both confident
    # on the true class 1; q must put more mass on class 1 than the generalist does.
    gen, subsets = _spec_case()
    gen = torch.cat([gen, torch.tensor([[1.9, 2.0, 1.8, 0.0, 0.0, -1.0]])])
    spec = [torch.tensor([[-2.0, 3.0, -2.0]] * 2), torch.tensor([[-2.0, -2.0, 3.0]] * 2)]
    p_gen = gen.softmax(-1)
    values = []
    for steps in range(0, 31, 3):
        log_q, active = combine_specialists(gen, spec, subsets, top_n=3, steps=steps)
        p_spec = [s.softmax(-1) for s in spec]
        values.append(specialist_objective(log_q, p_gen, p_spec, subsets, active))
    values = torch.stack(values)
    assert (values[1:] <= values[:-1] + 1e-6).all() and (values[-1] < values[0] - 0.1).all()
    q = log_q.exp()
    assert (q[:, 1] > p_gen[:, 1] + 0.1).all() and (q.argmax(-1) == 1).all()
    # against a slow reference: L-BFGS run to convergence on the objective written out by hand
    z = gen.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([z], max_iter=500, tolerance_grad=1e-10, line_search_fn="strong_wolfe")

    def objective():
        opt.zero_grad()
        lq = z.log_softmax(-1)
        total = (p_gen * (p_gen.log() - lq)).sum()
        for b in range(2):
            for s, ps in zip(subsets, spec):
                p = ps[b].softmax(-1)
                rest = [c for c in range(6) if c not in s.tolist()]
                pooled = torch.cat([lq[b, s], lq[b, rest].logsumexp(0, keepdim=True)])
                total = total + (p * (p.log() - pooled)).sum()
        total.backward()
        return total

    opt.step(objective)
    q_ref = z.detach().softmax(-1)
    torch.testing.assert_close(combine_specialists(gen, spec, subsets, 3, 300)[0].exp(), q_ref,
                               atol=2e-3, rtol=0)  # fmt: skip


def test_specialist_starts_from_the_generalist_and_maps_labels_to_subset_and_dustbin():
    torch.manual_seed(0)
    gen = mlp(4, (8,), 5)
    spec = Specialist(gen, [3, 1])
    x = torch.randn(7, 4)
    with torch.no_grad():
        g, s = gen(x), spec(x)
    torch.testing.assert_close(s[:, :2], g[:, [1, 3]])
    assert spec.targets(torch.tensor([0, 1, 2, 3, 4])).tolist() == [2, 0, 2, 1, 2]
    with pytest.raises(ValueError, match="subset"):
        Specialist(gen, [2])


def test_covariance_clustering_groups_classes_the_generalist_predicts_together():
    g = torch.Generator().manual_seed(0)
    # classes 0-2 share mass, 3-4 share mass, 5 stands alone
    groups = [[0, 1, 2], [3, 4], [5]]
    probs = torch.zeros(600, 6)
    for i, k in enumerate(torch.randint(0, 3, (600,), generator=g).tolist()):
        w = torch.rand(len(groups[k]), generator=g)
        probs[i, groups[k]] = w / w.sum()
    assert confusable_clusters(probs, 3) == [[0, 1, 2], [3, 4]]


def test_specialists_train_on_half_subset_data_with_the_log_oversampling_dustbin_shift():
    x, y = _blobs(n_per=50)
    torch.manual_seed(0)
    gen = mlp(2, (16,), 3)
    train_dense(gen, x, y, epochs=3, seed=0)
    (spec,) = train_specialists(gen, x, y, num_clusters=1, subsets=[[0, 1]], epochs=2, seed=0)
    n_in = int(torch.isin(y, torch.tensor([0, 1])).sum())
    n_out = min(n_in, len(y) - n_in)
    assert spec.dustbin_shift.item() == pytest.approx(math.log((len(y) - n_in) / n_out))


def test_hard_moe_of_linear_experts_beats_one_linear_model_on_blobs_labelled_differently():
    # Gross et al. (2017) toy check: 4 far-apart blobs, each with its own random linear
    # labelling; one linear expert per cluster fits each labelling, one linear model cannot.
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[5.0, 0], [-5, 0], [0, 5], [0, -5]])
    rules = torch.randn(4, 2, 3, generator=g)

    def sample(n):
        blob = torch.randint(0, 4, (n,), generator=g)
        local = torch.randn(n, 2, generator=g)
        return centers[blob] + local, torch.einsum("nd,ndc->nc", local, rules[blob]).argmax(-1)

    (x, y), (x_test, y_test) = sample(800), sample(400)
    torch.manual_seed(0)
    single = nn.Linear(2, 3)
    train_dense(single, x, y, epochs=30, batch_size=32, lr=0.1, seed=0)
    moe = HardMoE(nn.Identity(), [nn.Linear(2, 3) for _ in range(4)], None, d_feature=2)
    train_hard_moe(moe, x, y, epochs=30, batch_size=32, lr=0.1, seed=0)
    with torch.no_grad():
        acc_single = (single(x_test).argmax(-1) == y_test).float().mean().item()
        acc_moe = (moe(x_test).argmax(-1) == y_test).float().mean().item()
    assert acc_moe > 0.85 and acc_moe > acc_single + 0.10  # measured 0.91 vs 0.36


def test_dustbin_shift_makes_the_specialist_calibrated_on_natural_data():
    # PAPERS CPU check (Hinton et al. 2015, §5): trained half on its rare subset {0, 1} (20% of
    # natural data), the specialist's mean dustbin probability on natural held-out data is
    # far below the true 0.8 without the log-oversampling shift and within 0.05 of it with it.
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[1.0, 0], [-1, 0], [0, 1], [0, -1]]) * 1.5

    def sample(n):
        y = torch.multinomial(torch.tensor([0.1, 0.1, 0.4, 0.4]), n, True, generator=g)
        return centers[y] + torch.randn(n, 2, generator=g), y

    (x, y), (x_test, y_test) = sample(3000), sample(2000)
    torch.manual_seed(0)
    gen = mlp(2, (16,), 4)
    train_dense(gen, x, y, epochs=5, batch_size=64, lr=0.01, seed=0)
    (spec,) = train_specialists(gen, x, y, num_clusters=1, subsets=[[0, 1]], epochs=5,
                                batch_size=64, lr=0.01, seed=0)  # fmt: skip
    natural = (y_test >= 2).float().mean().item()
    with torch.no_grad():
        corrected = spec(x_test).softmax(-1)[:, -1].mean().item()
        spec.dustbin_shift.zero_()
        uncorrected = spec(x_test).softmax(-1)[:, -1].mean().item()
    assert abs(corrected - natural) < 0.05 and natural - uncorrected > 0.1  # 0.817, 0.620, 0.807


def test_fit_is_deterministic_under_a_seed_and_rejects_empty_or_ragged_data():
    x, y = _blobs(n_per=20)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = mlp(2, (8,), 3)
        history = train_dense(model, x, y, epochs=2, batch_size=16, seed=5)
        runs.append((history, model.state_dict()))
    assert runs[0][0] == runs[1][0] and runs[0][0][1] < runs[0][0][0]
    for k, v in runs[0][1].items():
        assert torch.equal(v, runs[1][1][k])
    with pytest.raises(ValueError, match="equal length >= 1"):
        fit(mlp(2, (8,), 3), lambda m, a, b: a.sum(), (x[:0], y[:0]))
    with pytest.raises(ValueError, match="equal length >= 1"):
        fit(mlp(2, (8,), 3), lambda m, a, b: a.sum(), (x, y[:5]))
