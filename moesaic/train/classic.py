"""Training the classic mixtures (``moesaic.models.classic``): one small loop for all of them.

``fit`` is the loop: seeded shuffling, Adam, a tqdm bar, a loss function of the model and one
batch. Every trainer here calls it: the dense baseline and MILE (Jacobs et al. 1991), the hard
mixture's experts (Gross et al. 2017, §3: each on its own cluster, in separate processes when
asked), the specialists and the distilled student (Hinton et al. 2015, §2 and §5). Results are
deterministic under ``seed`` for a given thread count; parallel expert training equals serial
because each expert gets the same seed, data and thread count either way.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from moesaic.models.classic import ClassicMoE, HardMoE, Specialist, confusable_clusters
from moesaic.train.distill import distill_loss

__all__ = [
    "fit",
    "train_dense",
    "train_mile",
    "train_hard_moe",
    "train_specialists",
    "distill_student",
]

LossFn = Callable[..., torch.Tensor]


def fit(
    model: nn.Module,
    loss_fn: LossFn,
    tensors: Sequence[torch.Tensor],
    *,
    epochs: int = 5,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = False,
    desc: str = "train",
) -> list[float]:
    """Adam on ``loss_fn(model, *batch)`` over shuffled mini-batches of ``tensors`` (equal first
    dimension N); returns the mean loss of each epoch. Only parameters with ``requires_grad``
    train."""
    n = len(tensors[0])
    if n == 0 or any(len(t) != n for t in tensors):
        raise ValueError(
            f"{desc}: needs tensors of equal length >= 1, got {[len(t) for t in tensors]}"
        )
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    steps = math.ceil(n / batch_size)
    bar = tqdm(total=epochs * steps, desc=desc, unit="step", disable=not progress, leave=False)
    history = []
    model.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=g)
        total = 0.0
        for i in range(steps):
            rows = order[i * batch_size : (i + 1) * batch_size]
            loss = loss_fn(model, *(t[rows] for t in tensors))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(rows)
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        history.append(total / n)
    bar.close()
    model.eval()
    return history


def _cross_entropy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x.flatten(1)), y)


def train_dense(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **kw) -> list[float]:
    """Plain cross-entropy training (the dense baseline, the generalist)."""
    return fit(model, _cross_entropy, (x, y), **kw)


def _mile(model: ClassicMoE, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return model.loss(x, y)


def train_mile(model: ClassicMoE, x: torch.Tensor, y: torch.Tensor, **kw) -> list[float]:
    """Gate and experts trained together on the competitive mixture likelihood."""
    return fit(model, _mile, (x, y), **kw)


class _ExpertHead(nn.Module):
    """One hard-mixture expert followed by the (frozen) shared decoder."""

    def __init__(self, expert: nn.Module, decoder: nn.Module | None) -> None:
        super().__init__()
        self.expert, self.decoder = expert, decoder

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        out = self.expert(feats)
        return self.decoder(out) if self.decoder is not None else out


def _train_expert(job: tuple) -> dict[str, torch.Tensor]:
    """Train one expert on its cluster's features (runs in a worker process or inline)."""
    head, feats, y, kw, threads = _FORKED_JOBS[job] if isinstance(job, int) else job
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fit(head, _cross_entropy, (feats, y), **kw)
    finally:
        torch.set_num_threads(before)
    return head.expert.state_dict()


# The jobs of the running train_hard_moe: forked workers inherit them instead of receiving a
# pickled copy of every cluster's features through a pipe.
_FORKED_JOBS: list[tuple] = []


def _run_jobs(jobs: list[tuple], processes: int) -> list[dict[str, torch.Tensor]]:
    """Each job's trained expert state, serially or in ``processes`` workers. Workers fork where
    the platform can (Linux: no re-import of torch, jobs inherited) and spawn elsewhere; each
    sets its own thread count before any parallel region, as DataLoader workers do. The largest
    clusters go first, so the workers finish close together."""
    if processes <= 1:
        return [_train_expert(j) for j in jobs]
    order = sorted(range(len(jobs)), key=lambda i: -len(jobs[i][1]))
    fork = "fork" in torch.multiprocessing.get_all_start_methods()
    ctx = torch.multiprocessing.get_context("fork" if fork else "spawn")
    _FORKED_JOBS[:] = jobs if fork else []
    try:
        with ctx.Pool(min(processes, len(jobs))) as pool:
            done = pool.map(_train_expert, order if fork else [jobs[i] for i in order], 1)
    finally:
        _FORKED_JOBS.clear()
    states: list = [None] * len(jobs)
    for i, state in zip(order, done):
        states[i] = state
    return states


def train_hard_moe(
    model: HardMoE,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    balanced: bool = False,
    processes: int = 1,
    threads_per_expert: int = 1,
    kmeans_iters: int = 25,
    kmeans_sample: int | None = 10000,
    seed: int = 0,
    progress: bool = False,
    **kw,
) -> torch.Tensor:
    """Fit the centroids on trunk features, then train each expert on its cluster only.

    The centroids come from k-means (k-means++ start) on ``kmeans_sample`` training examples
    drawn under ``seed`` (all of them when None); then every training example is assigned.
    The trunk and shared decoder stay fixed (they come trained, e.g. from a dense model), so the
    experts need no communication: with ``processes > 1`` they train in that many
    ``torch.multiprocessing`` workers, each with ``threads_per_expert`` threads, and the result
    equals serial training. ``balanced`` runs balanced k-means and a balanced partition of the
    training set. Returns the cluster (N,) of every training example; ``kw`` goes to ``fit``
    (epochs, batch_size, lr).
    """
    with torch.no_grad():
        feats = model.features(x)
    sample = feats
    if kmeans_sample is not None and kmeans_sample < len(feats):
        pick = torch.randperm(len(feats), generator=torch.Generator().manual_seed(seed))
        sample = feats[pick[:kmeans_sample]]
    model.router.fit(sample, iters=kmeans_iters, seed=seed, balanced=balanced, init="kmeans++")
    cluster_N = model.router.assign(feats, balanced=balanced)
    for p in [*model.trunk.parameters(), *(model.decoder or nn.Identity()).parameters()]:
        p.requires_grad_(False)
    jobs = []
    for e, expert in enumerate(model.experts):
        rows = torch.nonzero(cluster_N == e).flatten()
        head = _ExpertHead(expert, model.decoder)
        job_kw = dict(kw, seed=seed + 1000 * (e + 1), desc=f"expert {e}", progress=progress)
        jobs.append((head, feats[rows], y[rows], job_kw, threads_per_expert))
    jobs = [j for j in jobs if len(j[1])]  # a starved expert keeps its initial weights
    for (head, *_), state in zip(jobs, _run_jobs(jobs, processes)):
        head.expert.load_state_dict(state)
    model.eval()
    return cluster_N


def _specialist_loss(model: Specialist, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), model.targets(y))


def train_specialists(
    generalist: nn.Sequential,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    num_clusters: int,
    subsets: Sequence[Sequence[int]] | None = None,
    seed: int = 0,
    **kw,
) -> list[Specialist]:
    """One specialist per confusable class cluster of ``generalist`` (Hinton et al. 2015, §5).

    The clusters come from ``confusable_clusters`` on the generalist's training predictions
    unless ``subsets`` are given. Each specialist starts from the generalist and trains on all
    of its subset's examples plus as many drawn at random from the rest (dustbin); its
    ``dustbin_shift`` is then set to the log of the oversampling ratio,
    ``log((N - n_subset) / n_dustbin)``, which restores the natural class prior.
    """
    if subsets is None:
        with torch.no_grad():
            probs = generalist(x.flatten(1)).softmax(-1)
        subsets = confusable_clusters(probs, num_clusters, seed=seed)
    g = torch.Generator().manual_seed(seed)
    specialists = []
    for m, subset in enumerate(subsets):
        spec = Specialist(generalist, subset)
        inside = torch.isin(y, spec.subset)
        rows_in, rows_out = torch.nonzero(inside).flatten(), torch.nonzero(~inside).flatten()
        rows_out = rows_out[torch.randperm(len(rows_out), generator=g)[: len(rows_in)]]
        rows = torch.cat([rows_in, rows_out])
        desc = f"specialist {m} {list(spec.subset.tolist())}"
        fit(spec, _specialist_loss, (x[rows], y[rows]), seed=seed + m + 1, desc=desc, **kw)
        spec.dustbin_shift.fill_(math.log((len(y) - len(rows_in)) / max(len(rows_out), 1)))
        specialists.append(spec)
    return specialists


def distill_student(
    student: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 2.0,
    hard_weight: float = 0.1,
    **kw,
) -> list[float]:
    """Train ``student`` on ``distill_loss`` (T^2-scaled soft targets of ``teacher_logits``,
    e.g. the specialist ensemble's log q) plus ``hard_weight`` times the hard-label
    cross-entropy (Hinton et al. 2015, §2: the hard term gets a much lower weight)."""

    def loss(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor, tb: torch.Tensor):
        logits = model(xb.flatten(1))
        return distill_loss(logits, tb, temperature) + hard_weight * F.cross_entropy(logits, yb)

    return fit(student, loss, (x, y, teacher_logits), **kw)
