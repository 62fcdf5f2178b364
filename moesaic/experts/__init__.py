"""Expert FFNs and the sort-based dispatch that feeds them."""

from moesaic.experts.dispatch import DispatchPlan, combine, make_plan, permute
from moesaic.experts.ffn import ACTIVATIONS, Experts

__all__ = ["Experts", "ACTIVATIONS", "DispatchPlan", "make_plan", "permute", "combine"]
