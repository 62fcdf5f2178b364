"""The classic mixtures on Fashion-MNIST: the experiments behind ``moesaic classic``.

Every run trains on a seeded subset of the 60k training images and scores on the 10k test
images (``moesaic.data.images``; inputs scaled to [0, 1] and flattened to 784 features).
The dense baseline is an MLP 784-H-H-10; every expert has that shape too, so a hard mixture or
MELE activates exactly one dense model's parameters per example (MILE runs all its experts).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from typing import Any

import torch
from torch import nn

from moesaic._validate import check_positive_float, check_positive_int
from moesaic.data.images import FASHION_CLASSES_EN, fashion_mnist
from moesaic.metrics.partition import class_expert_table, normalized_mutual_info
from moesaic.models.classic import ClassicMoE, HardMoE, combine_specialists, mlp
from moesaic.train.classic import (
    distill_student,
    train_dense,
    train_hard_moe,
    train_mile,
    train_specialists,
)

__all__ = [
    "ClassicSetup",
    "load_data",
    "run_dense",
    "run_dense_longer",
    "run_mile",
    "run_mele",
    "run_hard",
    "run_specialists",
]

D_IN, CLASSES = 784, 10
TOPS = (0, 2, 4, 6)  # T-shirt/top, pullover, coat, shirt: the classes most often confused


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClassicSetup:
    """One experiment's settings; every field is checked before any work starts."""

    n_train: int = 20000  # training images drawn from the 60k
    n_test: int = 10000  # test images drawn from the 10k
    hidden: int = 64  # H: the dense model and every expert are MLPs 784-H-H-10
    experts: int = 4
    epochs: int = 8  # for the dense model, MILE, and each hard-mixture / MELE expert
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0
    balanced: bool = False  # balanced k-means and partition for MELE / hard
    processes: int = 1  # worker processes training hard-mixture / MELE experts
    clusters: int = 3  # k of the confusable-class clustering (specialists)
    subsets: tuple[tuple[int, ...], ...] = ()  # the specialists' classes instead of clustering
    spec_epochs: int = 4
    temperature: float = 2.0  # distillation of the student from the specialist ensemble
    top_n: int = 2  # a specialist is active when it covers one of the generalist's top_n
    combine_steps: int = 30  # gradient steps of the eq. 5 combination
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("n_train", "n_test", "hidden", "experts", "epochs", "batch_size",
                     "processes", "clusters", "spec_epochs", "top_n"):  # fmt: skip
            check_positive_int(name, getattr(self, name))
        if isinstance(self.combine_steps, bool) or not isinstance(self.combine_steps, int):
            raise TypeError(f"combine_steps={self.combine_steps!r} must be an int")
        if self.combine_steps < 0:
            raise ValueError(f"combine_steps={self.combine_steps} must be >= 0")
        for name in ("lr", "temperature"):
            check_positive_float(name, getattr(self, name))
        limits = {"n_train": 60000, "n_test": 10000, "clusters": CLASSES, "top_n": CLASSES}
        for name, top in limits.items():
            if getattr(self, name) > top:
                raise ValueError(f"{name}={getattr(self, name)} must be <= {top}")
        for i, subset in enumerate(self.subsets):
            if len(set(subset)) < 2 or not all(0 <= c < CLASSES for c in subset):
                raise ValueError(
                    f"subsets[{i}]={list(subset)} must hold two or more distinct classes in "
                    f"[0, {CLASSES})"
                )
        if self.experts > self.n_train:
            raise ValueError(f"experts={self.experts} must be <= n_train={self.n_train}")

    def fit_kw(self, epochs: int | None = None) -> dict[str, Any]:
        return dict(epochs=epochs or self.epochs, batch_size=self.batch_size, lr=self.lr,
                    seed=self.seed, progress=self.progress)  # fmt: skip


def load_data(setup: ClassicSetup) -> dict[str, torch.Tensor]:
    """Float inputs (N, 784) in [0, 1] and int64 labels for the train and test subsets."""
    x_tr, y_tr = fashion_mnist("train", setup.n_train, seed=setup.seed)
    x_te, y_te = fashion_mnist("test", setup.n_test, seed=setup.seed)

    def scaled(x):
        return torch.from_numpy(x.reshape(len(x), -1).astype("float32") / 255.0)

    return {"x_train": scaled(x_tr), "y_train": torch.from_numpy(y_tr),
            "x_test": scaled(x_te), "y_test": torch.from_numpy(y_te)}  # fmt: skip


def _dense(setup: ClassicSetup) -> nn.Sequential:
    torch.manual_seed(setup.seed)
    return mlp(D_IN, (setup.hidden, setup.hidden), CLASSES)


def _params(*modules: nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


@torch.no_grad()
def _accuracy(pred_N: torch.Tensor, y_N: torch.Tensor) -> float:
    return float((pred_N == y_N).double().mean())


def _partition(data: dict, expert_N: torch.Tensor, E: int) -> dict[str, Any]:
    table = class_expert_table(data["y_test"], expert_N, CLASSES, E)
    return {"table": table.tolist(), "nmi": normalized_mutual_info(table)}


def run_dense(setup: ClassicSetup, data: dict) -> tuple[nn.Sequential, dict[str, Any]]:
    """The dense baseline (also the hard mixture's trunk and decoder, and the generalist)."""
    model = _dense(setup)
    start = time.perf_counter()
    train_dense(model, data["x_train"], data["y_train"], desc="dense", **setup.fit_kw())
    seconds = time.perf_counter() - start
    with torch.no_grad():
        acc = _accuracy(model(data["x_test"]).argmax(-1), data["y_test"])
    n = _params(model)
    return model, {"name": "dense", "accuracy": acc, "params": n, "activated": n,
                   "train_s": seconds}  # fmt: skip


def run_dense_longer(
    setup: ClassicSetup, data: dict, dense: nn.Sequential
) -> tuple[nn.Sequential, dict[str, Any]]:
    """The control for the hard mixture, whose experts start from the trained dense model and
    train ``epochs`` more: a copy of the dense model trained ``epochs`` more on all the data."""
    model = copy.deepcopy(dense)
    start = time.perf_counter()
    train_dense(model, data["x_train"], data["y_train"], desc="dense, longer",
                **setup.fit_kw() | {"seed": setup.seed + 11})  # fmt: skip
    seconds = time.perf_counter() - start
    with torch.no_grad():
        acc = _accuracy(model(data["x_test"]).argmax(-1), data["y_test"])
    n = _params(model)
    return model, {"name": "dense, trained longer", "accuracy": acc, "params": n,
                   "activated": n, "train_s": seconds}  # fmt: skip


def run_mile(setup: ClassicSetup, data: dict) -> tuple[ClassicMoE, dict[str, Any]]:
    """MILE: a linear softmax gate over E expert MLPs, trained jointly."""
    torch.manual_seed(setup.seed)
    model = ClassicMoE(D_IN, CLASSES, setup.experts, hidden=(setup.hidden, setup.hidden))
    start = time.perf_counter()
    train_mile(model, data["x_train"], data["y_train"], desc="MILE", **setup.fit_kw())
    seconds = time.perf_counter() - start
    with torch.no_grad():
        acc = _accuracy(model.predict(data["x_test"]).argmax(-1), data["y_test"])
        expert_N = model.assign(data["x_test"])
    n = _params(model)
    return model, {"name": "MILE", "accuracy": acc, "params": n, "activated": n, "train_s": seconds,
            **_partition(data, expert_N, setup.experts)}  # fmt: skip


def _run_hard(
    setup: ClassicSetup, data: dict, model: HardMoE, name: str
) -> tuple[HardMoE, dict[str, Any]]:
    start = time.perf_counter()
    cluster = train_hard_moe(model, data["x_train"], data["y_train"], balanced=setup.balanced,
                             processes=setup.processes, **setup.fit_kw())  # fmt: skip
    seconds = time.perf_counter() - start
    with torch.no_grad():
        acc = _accuracy(model(data["x_test"]).argmax(-1), data["y_test"])
        expert_N = model.assign(data["x_test"])
    decoder = [model.decoder] if model.decoder is not None else []
    E = len(model.experts)
    return model, {
        "name": f"{name}, balanced" if setup.balanced else name,
        "accuracy": acc,
        "params": _params(model),
        "activated": _params(model.trunk, model.experts[0], *decoder),
        "train_s": seconds,
        "train_counts": torch.bincount(cluster, minlength=E).tolist(),
        **_partition(data, expert_N, E),
    }


def run_mele(setup: ClassicSetup, data: dict) -> tuple[HardMoE, dict[str, Any]]:
    """MELE: k-means on the pixels, one full expert MLP per cluster, each with its own output."""
    torch.manual_seed(setup.seed)
    experts = [mlp(D_IN, (setup.hidden, setup.hidden), CLASSES) for _ in range(setup.experts)]
    return _run_hard(setup, data, HardMoE(nn.Identity(), experts, None, D_IN), "MELE")


def run_hard(
    setup: ClassicSetup, data: dict, dense: nn.Sequential
) -> tuple[HardMoE, dict[str, Any]]:
    """Hard MoE: the trained dense model's first layer is the trunk, its output layer the shared
    (frozen) decoder, and each expert starts as a copy of its second layer."""
    model = HardMoE.from_dense(dense, setup.experts, trunk_layers=2)
    return _run_hard(setup, data, model, "hard MoE")


def run_specialists(setup: ClassicSetup, data: dict, generalist: nn.Sequential) -> dict[str, Any]:
    """Specialists on the generalist's confusable clusters, their eq. 5 combination, a student
    of the generalist's shape distilled from that combination, and a control: the generalist
    trained on as many more examples as the specialists were."""
    x, y = data["x_train"], data["y_train"]
    start = time.perf_counter()
    specialists = train_specialists(generalist, x, y, num_clusters=setup.clusters,
                                    subsets=[list(s) for s in setup.subsets] or None,
                                    **setup.fit_kw(setup.spec_epochs))  # fmt: skip
    spec_s = time.perf_counter() - start
    subsets = [s.subset for s in specialists]

    @torch.no_grad()
    def ensemble(inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        gen = generalist(inputs)
        log_q, active = combine_specialists(gen, [s(inputs) for s in specialists], subsets,
                                            setup.top_n, setup.combine_steps)  # fmt: skip
        return gen, log_q, active

    gen_te, log_q_te, active_te = ensemble(data["x_test"])
    _, log_q_tr, _ = ensemble(x)
    student = _dense(dataclasses.replace(setup, seed=setup.seed + 7))
    start = time.perf_counter()
    distill_student(student, x, y, log_q_tr, temperature=setup.temperature, desc="student",
                    **setup.fit_kw())  # fmt: skip
    student_s = time.perf_counter() - start
    # The control: the generalist trained on as many more examples as the specialists saw
    # (each saw its subset twice over, half subset and half dustbin, for spec_epochs)
    seen = sum(min(2 * int(torch.isin(y, s).sum()), len(y)) for s in subsets) * setup.spec_epochs
    longer_epochs = max(1, round(seen / len(y)))
    longer = copy.deepcopy(generalist)
    train_dense(longer, x, y, desc="generalist, longer",
                **setup.fit_kw(longer_epochs) | {"seed": setup.seed + 11})  # fmt: skip
    with torch.no_grad():
        stu_te, longer_te = student(data["x_test"]), longer(data["x_test"])
    y_te = data["y_test"]
    preds = {"generalist": gen_te.argmax(-1), "generalist + specialists": log_q_te.argmax(-1),
             "distilled student": stu_te.argmax(-1),
             "generalist, trained longer": longer_te.argmax(-1)}  # fmt: skip
    clusters = []
    for s in [*subsets, torch.tensor(TOPS)]:
        inside = torch.isin(y_te, s)
        g_ok, q_ok = preds["generalist"] == y_te, preds["generalist + specialists"] == y_te
        clusters.append({
            "classes": [FASHION_CLASSES_EN[c] for c in s.tolist()],
            "n_test": int(inside.sum()),
            "accuracy": {k: _accuracy(p[inside], y_te[inside]) for k, p in preds.items()},
            "errors_generalist": int((~g_ok & inside).sum()),
            "fixed": int((~g_ok & q_ok & inside).sum()),
            "broken": int((g_ok & ~q_ok & inside).sum()),
        })  # fmt: skip
    return {
        "subsets": [s.tolist() for s in subsets],
        "overall": {k: _accuracy(p, y_te) for k, p in preds.items()},
        "clusters": clusters[:-1],
        "tops": clusters[-1],  # the same counts on T-shirt/top, pullover, coat, shirt
        "active_fraction": float(active_te.sum(1).gt(0).double().mean()),
        "longer_epochs": longer_epochs,
        "specialists_train_s": spec_s,
        "student_train_s": student_s,
        "log_dustbin_shift": [float(s.dustbin_shift) for s in specialists],
        "nll": {
            "generalist": float(-gen_te.log_softmax(-1).gather(1, y_te[:, None]).mean()),
            "generalist + specialists": float(-log_q_te.gather(1, y_te[:, None]).mean()),
            "distilled student": float(-stu_te.log_softmax(-1).gather(1, y_te[:, None]).mean()),
        },  # fmt: skip
    }
