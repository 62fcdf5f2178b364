"""The CPU expert backend ("cpu") and the routers' CPU gate product.

Importing this package registers both; the core looks it up by name
(``moesaic.experts.backend.PLUGINS``) and works without it, on the "torch" backend.
"""

from moesaic.experts.backend import register_backend
from moesaic.kernels.cpu import gate as _gate  # noqa: F401  (registers the gate product)
from moesaic.kernels.cpu.backend import CpuBackend
from moesaic.kernels.cpu.capability import CpuCapability, cpu_capability
from moesaic.kernels.cpu.tuning import DEFAULT_TUNING, CpuTuning

register_backend(CpuBackend(DEFAULT_TUNING))

__all__ = ["CpuBackend", "CpuCapability", "CpuTuning", "DEFAULT_TUNING", "cpu_capability"]
