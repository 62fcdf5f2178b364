"""Router replay: record every router's discrete decisions, then route again with them.

``ms.record_routing()`` records, for each router call in order, the decisions the router made
(which experts, which tokens, which random second choices were kept: whatever it passed through
``Router.decide``), the assignments it returned and the random number generator states around
the call. Inside ``ms.replay_routing(recorder)`` each router takes its next recorded call: it
recomputes everything differentiable from the current parameters (logits, scores, aux losses,
with the random draws of the recorded call: noise, jitter) and gathers its combine weights at
the recorded experts instead of choosing them again. Replaying the same input with the same
parameters therefore gives bit-identical outputs and gradients, also for stochastic routers
(noisy top-k, GShard's random second expert, Switch jitter), and a costly choice (the BASE
layer's assignment, Sinkhorn) is not solved again. Uses:

- activation checkpointing: record the forward, replay the recomputation in backward;
- exact comparisons: run one input twice, or two implementations, under the same routing;
- routing replay for training on decisions taken elsewhere (with other parameters, the weights
  are the current scores at the recorded experts).

Example::

    with ms.record_routing() as recorder:
        y = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
    with ms.replay_routing(recorder):
        y.sum().backward()          # the recomputation routes exactly as the forward did

A replayed call leaves the random number generators (CPU, and CUDA for CUDA tokens) as the
recorded call left them, as ``torch.utils.checkpoint`` does for a recomputed segment, so that
what follows the router in a recomputed segment draws the same numbers too.

Shape legend (docs/shapes.md): T tokens, D model dim, A assignments.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from moesaic.routing.base import Router, Routing

__all__ = ["RoutingRecord", "RoutingRecorder", "record_routing", "replay_routing"]


@dataclasses.dataclass
class RoutingRecord:
    """One router call.

    Attributes:
        shape: (T, D) of the tokens the router saw.
        decisions: the tensors the router passed through ``Router.decide``, in order.
        token, expert, choice: LongTensors (A,), the assignments it returned.
        priority: (A,) the drop priorities it returned (detached), or None.
        dense_k: the returned ``Routing.dense_k``.
    """

    shape: tuple[int, int]
    decisions: list[torch.Tensor] = dataclasses.field(default_factory=list)
    token: torch.Tensor | None = None
    expert: torch.Tensor | None = None
    choice: torch.Tensor | None = None
    priority: torch.Tensor | None = None
    dense_k: int | None = None
    rng_before: tuple | None = dataclasses.field(default=None, repr=False)
    rng_after: tuple | None = dataclasses.field(default=None, repr=False)


class RoutingRecorder:
    """What ``record_routing`` saw: a list of ``RoutingRecord`` per router module, in call order.

    ``recorder[router]`` is that router's list (a layer called twice has two records);
    ``len(recorder)`` counts the calls of all routers.
    """

    def __init__(self) -> None:
        self.records: dict[Router, list[RoutingRecord]] = {}

    def __getitem__(self, router: Router) -> list[RoutingRecord]:
        return self.records.get(router, [])

    def __contains__(self, router: object) -> bool:
        return router in self.records

    def __len__(self) -> int:
        return sum(len(calls) for calls in self.records.values())

    def routers(self) -> list[Router]:
        """The routers that were called, in the order of their first call."""
        return list(self.records)


@contextlib.contextmanager
def record_routing() -> Iterator[RoutingRecorder]:
    """Record the routing decisions of every router called inside the block.

    Yields a ``RoutingRecorder``; pass it to ``replay_routing``. See the module docstring.
    """
    recorder = RoutingRecorder()
    with _session(_Recording(recorder)):
        yield recorder


@contextlib.contextmanager
def replay_routing(recorder: RoutingRecorder) -> Iterator[RoutingRecorder]:
    """Make every router called inside the block take its next recorded decisions.

    Each router's calls are replayed in order, from its first record, however often the block
    is entered. A call beyond the recorded ones, or on tokens of another shape, raises a
    ValueError; records left unused are fine (a recomputed segment replays only its layers).
    """
    if not isinstance(recorder, RoutingRecorder):
        raise TypeError(
            f"replay_routing(recorder): recorder must be the RoutingRecorder that "
            f"ms.record_routing() yields, got {type(recorder).__name__}"
        )
    with _session(_Replay(recorder)):
        yield recorder


# The active session, global rather than thread-local: autograd may run a checkpointed
# segment's recomputation on a device thread of its own.
_ACTIVE: _Recording | _Replay | None = None


@contextlib.contextmanager
def _session(session: _Recording | _Replay) -> Iterator[None]:
    global _ACTIVE
    if _ACTIVE is not None:
        raise RuntimeError(
            "record_routing() and replay_routing() cannot nest: a block of one is already open"
        )
    _ACTIVE = session
    try:
        yield
    finally:
        _ACTIVE = None


def begin_call(router: Router, x_TD: torch.Tensor) -> None:
    """Called before every router forward (a forward pre-hook of ``Router``)."""
    if _ACTIVE is not None:
        _ACTIVE.begin(router, x_TD)


def end_call(router: Router, routing: Routing) -> Routing:
    """Called after every router forward (a forward hook of ``Router``)."""
    return routing if _ACTIVE is None else _ACTIVE.end(router, routing)


def decide(router: Router, choose: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``Router.decide``: run ``choose``, record its result, or return the recorded one."""
    return choose() if _ACTIVE is None else _ACTIVE.decide(router, choose)


class _Recording:
    def __init__(self, recorder: RoutingRecorder) -> None:
        self.recorder = recorder
        self.open: dict[Router, RoutingRecord] = {}

    def begin(self, router: Router, x_TD: torch.Tensor) -> None:
        record = RoutingRecord(shape=tuple(x_TD.shape), rng_before=_get_rng(x_TD.device))
        self.open[router] = record

    def decide(self, router: Router, choose: Callable[[], torch.Tensor]) -> torch.Tensor:
        decision = choose()
        if router in self.open:  # a copy: nothing the router does to its tensor reaches it
            self.open[router].decisions.append(decision.detach().clone())
        return decision

    def end(self, router: Router, routing: Routing) -> Routing:
        record = self.open.pop(router)
        record.token, record.expert = routing.token.detach(), routing.expert.detach()
        record.choice, record.dense_k = routing.choice.detach(), routing.dense_k
        record.priority = None if routing.priority is None else routing.priority.detach()
        record.rng_after = _get_rng(routing.token.device)
        self.recorder.records.setdefault(router, []).append(record)
        return routing


class _Replay:
    def __init__(self, recorder: RoutingRecorder) -> None:
        self.recorder = recorder
        self.calls: dict[Router, int] = {}
        self.open: dict[Router, tuple[RoutingRecord, list[int]]] = {}

    def begin(self, router: Router, x_TD: torch.Tensor) -> None:
        records, call = self.recorder[router], self.calls.get(router, 0)
        name = _name(router)
        if call >= len(records):
            raise ValueError(
                f"replay_routing: {name} is called {call + 1} times but the records hold "
                f"{len(records)} calls of it"
            )
        record = records[call]
        if tuple(x_TD.shape) != record.shape:
            raise ValueError(
                f"replay_routing: call {call} of {name} gets x_TD.shape={tuple(x_TD.shape)}; "
                f"the recorded call had {record.shape}, and the shapes must be equal"
            )
        self.calls[router] = call + 1
        self.open[router] = (record, [0])
        _set_rng(record.rng_before)

    def decide(self, router: Router, choose: Callable[[], torch.Tensor]) -> torch.Tensor:
        if router not in self.open:
            return choose()
        record, used = self.open[router]
        if used[0] >= len(record.decisions):
            raise ValueError(
                f"replay_routing: {_name(router)} makes more decisions than its recorded call "
                f"({len(record.decisions)}): was it recorded in another mode (train / eval)?"
            )
        used[0] += 1
        return record.decisions[used[0] - 1].clone()

    def end(self, router: Router, routing: Routing) -> Routing:
        record, used = self.open.pop(router)
        same = (
            used[0] == len(record.decisions)
            and routing.dense_k == record.dense_k
            and all(
                torch.equal(getattr(routing, f), getattr(record, f))
                for f in ("token", "expert", "choice")
            )
        )
        if not same:
            raise ValueError(
                f"replay_routing: {_name(router)} did not reproduce its recorded assignments: "
                "it was recorded in another mode (train / eval), or it makes a decision outside "
                "Router.decide"
            )
        _set_rng(record.rng_after)
        # the drop priorities are decisions too (which assignments a full expert keeps)
        return dataclasses.replace(routing, priority=record.priority)


def _name(router: Router) -> str:
    return f"router {type(router).__name__} (id {id(router):#x})"


def _get_rng(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), device, cuda


def _set_rng(state: tuple) -> None:
    cpu, device, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)
