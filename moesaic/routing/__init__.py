"""Routers: each maps tokens (T, D) to flat (token, expert, weight) assignments plus aux losses."""

from moesaic.routing import (  # noqa: F401  (importing registers each router in ROUTERS)
    base_layer,
    cluster,
    expert_choice,
    gshard,
    hash,
    noisy,
    prototype,
    sinkhorn,
    switch,
    task,
    topk,
    vmoe,
)
from moesaic.routing.base import LearnedRouter, Router, Routing
from moesaic.routing.registry import ROUTERS, build_router, register_router
from moesaic.routing.replay import RoutingRecorder, record_routing, replay_routing
from moesaic.routing.topk import update_balance_biases

__all__ = [
    "Router",
    "LearnedRouter",
    "Routing",
    "ROUTERS",
    "register_router",
    "build_router",
    "update_balance_biases",
    "record_routing",
    "replay_routing",
    "RoutingRecorder",
]
