"""Dispatch: capacity and drop policies, the plan (one stable sort), permute and combine."""

from moesaic.dispatch.capacity import (
    DROP_POLICIES,
    DropPolicy,
    PositionPolicy,
    PriorityPolicy,
    expert_capacity,
)
from moesaic.dispatch.permute import combine, permute
from moesaic.dispatch.plan import DispatchPlan, make_plan

__all__ = [
    "DROP_POLICIES",
    "DispatchPlan",
    "DropPolicy",
    "PositionPolicy",
    "PriorityPolicy",
    "combine",
    "expert_capacity",
    "make_plan",
    "permute",
]
