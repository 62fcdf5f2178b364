"""Routing statistics during training: ``run_dir/routing.jsonl`` and ``run_dir/affinity.json``.

The trainer calls ``RoutingLog.record`` after each training forward; on logged steps (every
``log_every`` and the last) it appends one row per MoE layer to routing.jsonl::

    {"step": 10, "layer": "blocks.1.ffn", "tokens_per_expert": [...], "load_cv": 0.41,
     "dropped_fraction": 0.0, "entropy": 3.1, "dead_experts": 2, "affinity": [[...], ...]}

``affinity`` (labels x experts, kept assignments) is there only when the data has more than one
label (the mixture corpus's domains): each window's ``Batch.domain`` is its label, expanded to
every token. affinity.json holds its sum over the logged steps, per layer, with the label names.
Because the per-step counts live in routing.jsonl, a resumed run rebuilds the sums exactly from
the rows up to its checkpoint. In a distributed run only the main rank writes, its own tokens'
statistics.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moesaic.layer import MoE
from moesaic.train.checkpoint import write_atomic

__all__ = ["RoutingLog", "ROUTING_FILE", "AFFINITY_FILE", "read_routing"]

ROUTING_FILE = "routing.jsonl"
AFFINITY_FILE = "affinity.json"


class RoutingLog:
    """Collects per-layer routing statistics on logged steps.

    Args:
        run_dir: where routing.jsonl and affinity.json go.
        labels: the label names (``TokenStream.domains``); affinity is kept when there are 2+.
        log_every: steps between rows (the trainer's ``train.log_every``).
        last_step: the run's final step, always logged.
        start_step: the step training starts from; rows after it are dropped (0: a new run).
        write: False makes every call a no-op (the non-main ranks of a distributed run).
    """

    def __init__(
        self,
        run_dir: Path,
        labels: Sequence[str],
        log_every: int,
        last_step: int,
        start_step: int = 0,
        write: bool = True,
    ) -> None:
        self.write = write
        self.path = Path(run_dir) / ROUTING_FILE
        self.affinity_path = Path(run_dir) / AFFINITY_FILE
        self.labels = list(labels)
        self.log_every, self.last_step = log_every, last_step
        self.affinity: dict[str, torch.Tensor] = {}  # layer -> (labels, E) summed counts
        if not write:
            return
        kept = [r for r in read_routing(self.path) if r["step"] <= start_step]
        write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        for row in kept:
            self._add_affinity(row["layer"], row.get("affinity"))

    @property
    def track_affinity(self) -> bool:
        return len(self.labels) > 1

    def record(self, step: int, model: nn.Module, batch: Any) -> None:
        """Append ``model``'s last-forward statistics if ``step`` is a logged step.

        ``batch`` is the forward's ``Batch``: ``x`` (B, S) and ``domain`` (B,).
        """
        if not self.write or (step % self.log_every and step != self.last_step):
            return
        rows = []
        for name, layer in model.named_modules():
            if isinstance(layer, MoE) and layer.last_stats is not None:
                rows.append({"step": step, "layer": name, **layer.last_stats.as_dict()})
                if self.track_affinity:
                    counts = _affinity(layer, batch, len(self.labels))
                    rows[-1]["affinity"] = None if counts is None else counts.tolist()
                    self._add_affinity(name, rows[-1]["affinity"])
        with open(self.path, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)

    def flush(self) -> None:
        """Write affinity.json (the sums so far); a no-op for single-label data."""
        if not (self.write and self.track_affinity):
            return
        payload = {
            "labels": self.labels,
            "layers": {name: counts.tolist() for name, counts in self.affinity.items()},
        }
        write_atomic(self.affinity_path, json.dumps(payload) + "\n")

    def _add_affinity(self, layer: str, counts: list | None) -> None:
        if counts is None:
            return
        counts_LE = torch.tensor(counts, dtype=torch.long)
        if layer in self.affinity:
            self.affinity[layer] += counts_LE
        else:
            self.affinity[layer] = counts_LE


def _affinity(layer: MoE, batch: Any, num_labels: int) -> torch.Tensor | None:
    """(labels, E) counts of the layer's last forward; None if its tokens are not the batch's."""
    stats = layer.last_stats
    B = batch.x.shape[0]
    # positions per row of the forward: the batch's, or more with a soft prompt before them
    S = stats.num_tokens // B
    kept = stats.kept_token_A
    if kept is None or stats.num_tokens != B * S or (kept.numel() and int(kept.max()) >= B * S):
        return None
    labels_T = batch.domain.reshape(B).repeat_interleave(S)  # (B,) -> (B * S,), row-major
    return stats.affinity(labels_T, num_labels).cpu()


def read_routing(path: Path) -> list[dict[str, Any]]:
    """The rows of a routing.jsonl ([] if there is none)."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
