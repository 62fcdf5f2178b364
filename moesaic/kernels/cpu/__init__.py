"""CPU kernels: what the running CPU and torch build support (``capability``)."""

from moesaic.kernels.cpu.capability import CpuCapability, cpu_capability

__all__ = ["CpuCapability", "cpu_capability"]
