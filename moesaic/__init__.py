"""moesaic: sparse Mixture-of-Experts layers, routers and models for PyTorch.

import moesaic as ms
layer = ms.MoE(d_model=512, d_ff=2048, num_experts=8, router="switch")
"""

from moesaic import convert, inference, metrics, models, parallel
from moesaic.config import MoEConfig
from moesaic.context import RoutingContext, current_context, is_recomputing, routing_context
from moesaic.dispatch import DROP_POLICIES, expert_capacity
from moesaic.experts import Experts, backend_names
from moesaic.layer import MoE, aux_loss
from moesaic.routing import (
    ROUTERS,
    LearnedRouter,
    Router,
    Routing,
    RoutingRecorder,
    build_router,
    record_routing,
    register_router,
    replay_routing,
    update_balance_biases,
)
from moesaic.routing.stats import RoutingStats

moefy = convert.moefy

__version__ = "0.1.0"

__all__ = [
    "MoE",
    "MoEConfig",
    "Experts",
    "Router",
    "LearnedRouter",
    "Routing",
    "RoutingStats",
    "RoutingContext",
    "ROUTERS",
    "DROP_POLICIES",
    "aux_loss",
    "backend_names",
    "build_router",
    "current_context",
    "is_recomputing",
    "expert_capacity",
    "register_router",
    "routing_context",
    "update_balance_biases",
    "record_routing",
    "replay_routing",
    "RoutingRecorder",
    "moefy",
    "convert",
    "inference",
    "metrics",
    "models",
    "parallel",
]
