"""Dense-to-MoE conversion: ``moefy`` (sparse upcycling) and the FFN patterns it recognises;
Mixtral and Qwen2-MoE checkpoint import and export."""

from moesaic.convert.mixtral import export_mixtral, import_mixtral
from moesaic.convert.moefy import find_ffns, moefy, upcycled_moe
from moesaic.convert.patterns import PATTERNS, Conversion
from moesaic.convert.qwen2_moe import (
    export_qwen2_moe,
    import_qwen2_moe,
    lm_config_from_qwen2_moe,
    qwen2_moe_config,
)
from moesaic.convert.spec import FFNSpec, MoEFFN, MoEResidualNorm, Passthrough

__all__ = [
    "moefy",
    "find_ffns",
    "upcycled_moe",
    "export_mixtral",
    "import_mixtral",
    "export_qwen2_moe",
    "import_qwen2_moe",
    "qwen2_moe_config",
    "lm_config_from_qwen2_moe",
    "FFNSpec",
    "Conversion",
    "PATTERNS",
    "MoEFFN",
    "MoEResidualNorm",
    "Passthrough",
]
