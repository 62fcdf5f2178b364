"""Dense-to-MoE conversion: ``moefy`` (sparse upcycling) and the FFN patterns it recognises."""

from moesaic.convert.mixtral import export_mixtral, import_mixtral
from moesaic.convert.moefy import find_ffns, moefy, upcycled_moe
from moesaic.convert.patterns import PATTERNS, Conversion
from moesaic.convert.spec import FFNSpec, MoEFFN, MoEResidualNorm, Passthrough

__all__ = [
    "moefy",
    "find_ffns",
    "upcycled_moe",
    "export_mixtral",
    "import_mixtral",
    "FFNSpec",
    "Conversion",
    "PATTERNS",
    "MoEFFN",
    "MoEResidualNorm",
    "Passthrough",
]
