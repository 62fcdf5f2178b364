"""One table of router configurations; generic tests run over every row.

Each case builds an ``ms.MoE`` and knows which routing context its router needs, so a test can
say "for every router" without an if-ladder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from typing import Any

import pytest
import torch

import moesaic as ms


@dataclasses.dataclass(frozen=True)
class RouterCase:
    router: str
    top_k: int | None = None
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    needs_task: bool = False
    stochastic_in_training: bool = False

    @property
    def id(self) -> str:
        extra = ",".join(f"{k}={v}" for k, v in self.options.items() if k != "task_skills")
        return f"{self.router}-k{self.top_k}" + (f"-{extra}" if extra else "")

    def layer(self, d_model: int = 8, d_ff: int = 16, num_experts: int = 4, **kw) -> ms.MoE:
        return ms.MoE(
            d_model,
            d_ff,
            num_experts,
            router=self.router,
            top_k=self.top_k,
            router_options=dict(self.options) or None,
            **kw,
        )

    def context(self, batch: int) -> contextlib.AbstractContextManager:
        if self.needs_task:
            tasks = torch.arange(batch) % 3
            return ms.routing_context(task=tasks)
        return contextlib.nullcontext()


ROUTER_CASES = [
    RouterCase("topk", 1),
    RouterCase("topk", 2),
    RouterCase("topk", 2, {"normalize": False}),
    RouterCase("noisy_topk", 1, stochastic_in_training=True),
    RouterCase("noisy_topk", 2, stochastic_in_training=True),
    RouterCase("switch", 1, stochastic_in_training=True),
    RouterCase("gshard", 2, stochastic_in_training=True),
    RouterCase("prototype", 2),
    RouterCase("expert_choice", 1),
    RouterCase("expert_choice", 2),
    RouterCase("hash", 1),
    RouterCase("hash", 2),
    RouterCase("task", 2, {"num_tasks": 3}, needs_task=True),
    RouterCase("skill", None, {"task_skills": [[0], [1, 2], [3, 0, 1]]}, needs_task=True),
    RouterCase("cluster", 1),
    RouterCase("base", 1),
    RouterCase("sinkhorn", 1),
    RouterCase("sinkhorn", 2),
    RouterCase("vmoe", 1, stochastic_in_training=True),
    RouterCase("vmoe", 2, stochastic_in_training=True),
]


def capture_routing(layer: ms.MoE) -> list[ms.Routing]:
    """Record every Routing the layer's router returns (for comparison with the reference)."""
    seen: list[ms.Routing] = []
    layer.router.register_forward_hook(lambda module, args, out: seen.append(out))
    return seen


def require_debian(*packages: str) -> None:
    """Fail (never skip) a test whose Debian data is missing, naming the command that fixes it:
    every machine that runs README's test command has it."""
    from moesaic.data.debian import install_line, missing

    absent = missing(packages)
    if absent:
        pytest.fail(
            f"needs the Debian packages {', '.join(absent)}: run `moesaic data install --yes` "
            f"({install_line(absent)})",
            pytrace=False,
        )


def expert_backend(impl: str = "auto", gemm: str = "auto"):
    """An ``Experts`` backend for a test: "torch" or "grouped" by name, else the CPU backend
    with ``workers=impl`` ("auto" | "loop" | "threads") and ``gemm``."""
    if impl in ("torch", "grouped"):
        return impl
    from moesaic.kernels.cpu import CpuBackend, CpuTuning

    return CpuBackend(CpuTuning(gemm=gemm, workers=impl))


def metric_rows(run_dir) -> list[dict]:
    """Every row of a run's metrics.jsonl."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def without_timings(run_dir) -> list[dict]:
    """A run's metric rows without the wall-clock fields (speeds, ``train_s``): what an
    interrupted and resumed run must repeat bit for bit."""
    return [
        {k: v for k, v in r.items() if not k.endswith("_per_s") and k != "train_s"}
        for r in metric_rows(run_dir)
    ]
