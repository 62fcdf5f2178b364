"""RoutingLog: per-layer rows on logged steps, label-by-expert affinity, exact after resume."""

import json

import torch
from torch import nn

import moesaic as ms
from moesaic.data import Batch
from moesaic.metrics import RoutingLog, read_routing

# Skill routing with task = label makes the routing known in advance: label 0 -> expert 0,
# label 1 -> experts 1 and 2; expert 3 is never used.
SKILLS = [[0], [1, 2]]


class TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        opts = {"task_skills": SKILLS}
        self.a = ms.MoE(4, 8, 4, router="skill", router_options=opts)
        self.b = ms.MoE(4, 8, 4, router="skill", router_options=opts)

    def forward(self, x_BSD, domain_B):
        with ms.routing_context(task=domain_B):
            return self.b(self.a(x_BSD))


def _step(model, domain_B, S=5):
    B = len(domain_B)
    batch = Batch(torch.zeros(B, S, dtype=torch.long), torch.zeros(B, S, dtype=torch.long),
                  torch.tensor(domain_B))  # fmt: skip
    model(torch.randn(B, S, 4), batch.domain)
    return batch


def test_rows_hold_each_layers_statistics_on_logged_steps_only(tmp_path):
    model, log = TwoLayers(), RoutingLog(tmp_path, ["a", "b"], log_every=2, last_step=3)
    for step in (1, 2, 3):
        log.record(step, model, _step(model, [0, 1]))
    rows = read_routing(tmp_path / "routing.jsonl")
    assert [(r["step"], r["layer"]) for r in rows] == [(2, "a"), (2, "b"), (3, "a"), (3, "b")]
    # 5 tokens of label 0 on expert 0, 5 of label 1 on experts 1 and 2: loads 5, 5, 5, 0
    row = rows[0]
    assert row["tokens_per_expert"] == [5, 5, 5, 0]
    assert row["dead_experts"] == 1 and row["dropped_fraction"] == 0.0
    # mean 3.75, population variance (3 * 1.25^2 + 3.75^2) / 4 = 4.6875: cv = 1 / sqrt(3)
    assert abs(row["load_cv"] - 4.6875**0.5 / 3.75) < 1e-6
    assert row["affinity"] == [[5, 0, 0, 0], [0, 5, 5, 0]]


def test_affinity_json_sums_the_logged_steps_with_label_names(tmp_path):
    model, log = TwoLayers(), RoutingLog(tmp_path, ["code", "bible"], log_every=1, last_step=2)
    log.record(1, model, _step(model, [0, 1]))
    log.record(2, model, _step(model, [1, 1, 0]))
    log.flush()
    saved = json.loads((tmp_path / "affinity.json").read_text())
    assert saved["labels"] == ["code", "bible"]
    assert saved["layers"]["a"] == [[10, 0, 0, 0], [0, 15, 15, 0]]
    assert saved["layers"]["b"] == saved["layers"]["a"]


def test_resume_drops_rows_after_the_checkpoint_and_rebuilds_the_sums(tmp_path):
    model = TwoLayers()
    log = RoutingLog(tmp_path, ["x", "y"], log_every=1, last_step=4)
    for step, labels in enumerate(([0], [1], [1]), start=1):
        log.record(step, model, _step(model, labels))
    log.flush()  # as after a crash at step 3 whose newest checkpoint is step 2
    resumed = RoutingLog(tmp_path, ["x", "y"], log_every=1, last_step=4, start_step=2)
    resumed.record(3, model, _step(model, [0]))
    resumed.flush()
    steps = [r["step"] for r in read_routing(tmp_path / "routing.jsonl")]
    assert steps == [1, 1, 2, 2, 3, 3]
    saved = json.loads((tmp_path / "affinity.json").read_text())
    assert saved["layers"]["a"] == [[10, 0, 0, 0], [0, 5, 5, 0]]


def test_single_label_data_logs_statistics_without_affinity(tmp_path):
    model, log = TwoLayers(), RoutingLog(tmp_path, ["stdlib"], log_every=1, last_step=1)
    log.record(1, model, _step(model, [0, 0]))
    log.flush()
    rows = read_routing(tmp_path / "routing.jsonl")
    assert len(rows) == 2 and "affinity" not in rows[0]
    assert not (tmp_path / "affinity.json").exists()


def test_a_non_writing_log_touches_no_file(tmp_path):
    model = TwoLayers()
    log = RoutingLog(tmp_path, ["x", "y"], log_every=1, last_step=1, write=False)
    log.record(1, model, _step(model, [0, 1]))
    log.flush()
    assert list(tmp_path.iterdir()) == []
