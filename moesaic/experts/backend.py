"""How expert FFNs run: backends registered by name behind one small interface.

``"torch"`` is the plain autograd loop (moesaic/experts/loop.py), the readable definition every
other backend is tested against; ``"grouped"`` runs ``torch._grouped_mm``; ``"cpu"`` is the
tuned CPU path of moesaic/kernels/cpu/, registered when that package imports (it is looked up
by module name, never imported by the core, so deleting it costs speed only). ``"auto"`` takes
grouped for bf16 on CUDA, cpu for CPU tensors when it is present, and torch otherwise.

Shape legend (docs/shapes.md): A assignments grouped by expert, D model dim, T tokens.
"""

from __future__ import annotations

import abc
import importlib
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from moesaic.dispatch.plan import DispatchPlan
    from moesaic.experts.experts import Experts

__all__ = [
    "ExpertBackend",
    "BACKENDS",
    "register_backend",
    "get_backend",
    "find_backend",
    "backend_names",
    "records_autograd",
]

# Kernel packages that register backends when imported; looked up by name so that a missing one
# (deleted, or a platform without it) only leaves its backend unavailable.
PLUGINS = ("moesaic.kernels.cpu",)
BACKENDS: dict[str, ExpertBackend] = {}
_loaded = False


class ExpertBackend(abc.ABC):
    """Runs the E expert FFNs of an ``Experts`` module on rows grouped by expert.

    Subclasses set ``name`` and implement ``forward``; the others are optional.
    """

    name: str = ""

    def supports(self, experts: Experts, x_AD: torch.Tensor) -> bool:
        """Whether ``auto`` may pick this backend for these inputs."""
        return True

    @abc.abstractmethod
    def forward(self, experts: Experts, x_AD: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Expert e's FFN on rows ``sum(counts[:e]) .. sum(counts[:e + 1])``: (A, D) out."""

    def forward_combined(self, experts: Experts, x_TD: torch.Tensor, plan: DispatchPlan):
        """Forward-only calls: experts and combine in one pass, (T, D); None when the backend
        has no fused path for this plan (the layer then permutes, runs ``forward`` and
        combines)."""
        return None

    def pack(self, experts: Experts, rows_hint: int) -> None:
        """Keep a serving copy of the weights (``Experts.pack_for_inference``)."""
        raise ValueError(f"the {self.name!r} expert backend has no packed serving weights")

    def can_pack(self, experts: Experts) -> bool:
        return False


def register_backend(backend: ExpertBackend) -> ExpertBackend:
    """Make ``backend`` available by its ``name`` (replacing one of the same name)."""
    if not isinstance(backend, ExpertBackend) or not backend.name:
        raise TypeError(f"{backend!r} must be an ExpertBackend with a name")
    BACKENDS[backend.name] = backend
    return backend


def _load_plugins() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in PLUGINS:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name is None or not module.startswith(err.name):
                raise  # the package exists but one of its own imports is missing


def backend_names() -> tuple[str, ...]:
    """Names ``Experts(backend=...)`` accepts: "auto" and every registered backend."""
    _load_plugins()
    return ("auto", *BACKENDS)


def find_backend(name: str) -> ExpertBackend | None:
    """The backend registered as ``name``, or None when this installation has none."""
    _load_plugins()
    return BACKENDS.get(name)


def get_backend(name: str) -> ExpertBackend:
    """The backend registered as ``name`` (not "auto"), with a clear error when it is absent."""
    backend = find_backend(name)
    if backend is None:
        raise ValueError(
            f"backend={name!r} is not one of {backend_names()}"
            + (" (moesaic.kernels.cpu is not importable here)" if name == "cpu" else "")
        )
    return backend


def records_autograd(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd records an op on these tensors (grad mode on and one requires grad)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
