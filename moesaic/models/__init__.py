"""Models built from ``ms.MoE`` layers, created by name: ``ms.models.create("lm-moe-tiny")``."""

from moesaic.models.classic import ClassicMoE, HardMoE, Specialist, combine_specialists
from moesaic.models.lm import KVCache, LMConfig, MoELM
from moesaic.models.lstm import LSTMConfig, LSTMMoE
from moesaic.models.registry import MODELS, create, model_config, register_model

__all__ = [
    "LMConfig",
    "MoELM",
    "KVCache",
    "LSTMConfig",
    "LSTMMoE",
    "MODELS",
    "create",
    "model_config",
    "register_model",
    "ClassicMoE",
    "HardMoE",
    "Specialist",
    "combine_specialists",
]
