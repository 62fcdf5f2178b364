"""Expert FFNs (``Experts``) and the backends that run them, looked up by name."""

from moesaic.experts.backend import (
    ExpertBackend,
    backend_names,
    find_backend,
    get_backend,
    register_backend,
)
from moesaic.experts.experts import ACTIVATIONS, Experts

__all__ = [
    "ACTIVATIONS",
    "ExpertBackend",
    "Experts",
    "backend_names",
    "find_backend",
    "get_backend",
    "register_backend",
]
