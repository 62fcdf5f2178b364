"""One trainer, every task: prompt tuning leaves the language model bit-identical, a fine-tuning
run resumes bit for bit, frozen routers stay put, expert dropout reaches only the experts, the
distillation loss follows its formula and schedule, and task routers get each row's domain."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from moesaic.cli.distill import student_config
from moesaic.cli.finetune import finetune_config
from moesaic.data import ByteTokenizer, Document, TokenStream
from moesaic.layer import MoE
from moesaic.train.config import ConfigError, apply_overrides
from moesaic.train.data import PreparedData
from moesaic.train.distill import distill_loss, kd_weight
from moesaic.train.recipes import get_recipe
from moesaic.train.run import load_run
from moesaic.train.tasks import load_teacher
from moesaic.train.trainer import Trainer
from tests.cases import metric_rows, without_timings

SMALL = [  # three classes, 60 texts each: the data loads and encodes in a moment
    "finetune.num_classes=3",
    "finetune.per_class=60",
    "data.batch_size=8",
    "data.eval_batches=2",
    "train.steps=12",
    "train.eval_every=6",
    "train.checkpoint_every=6",
    "train.log_every=1",
    "finetune.prompt_tokens=4",
]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    run = tmp_path_factory.mktemp("pretrained") / "run"
    Trainer(get_recipe("lm-moe-test"), run, progress=False).fit()
    return run


def _cfg(pretrained, *overrides, task="fortune"):
    return finetune_config(pretrained, task, [*SMALL, *overrides])


def test_prompt_tuning_trains_only_the_prompt_and_the_classifier(pretrained, tmp_path):
    trainer = Trainer(_cfg(pretrained, "finetune.method=prompt"), tmp_path / "p", progress=False)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    lm = load_run(pretrained).model.state_dict()
    for name, value in lm.items():  # starts from the pretrained weights
        assert torch.equal(before[f"lm.{name}"], value), name
    trainer.fit()
    after = trainer.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"prompt", "classifier.weight", "classifier.bias"}
    trained = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    assert trained == 4 * 32 + 32 * 3 + 3  # P*D + D*C + C with D=32


def test_a_fine_tuning_run_resumes_bit_identically(pretrained, tmp_path):
    cfg = _cfg(pretrained)
    full = Trainer(cfg, tmp_path / "full", progress=False)
    full.fit()
    part = Trainer(cfg, tmp_path / "part", progress=False)
    part.fit(max_steps=6)
    resumed = Trainer(cfg, tmp_path / "part", progress=False, resume=True)
    assert resumed.step == 6
    resumed.fit()
    assert without_timings(tmp_path / "part") == without_timings(tmp_path / "full")
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert "val_acc" in full.evals[-1] and 0 <= full.evals[-1]["val_acc"] <= 1


def test_frozen_routers_stay_and_the_dropouts_reach_their_modules(pretrained, tmp_path):
    cfg = _cfg(pretrained, "finetune.freeze_router=true", "finetune.expert_dropout=0.3")
    trainer = Trainer(cfg, tmp_path / "r", progress=False)
    layers = [m for m in trainer.model.modules() if isinstance(m, MoE)]
    assert layers and all(m.experts.dropout == 0.3 for m in layers)
    assert trainer.model.lm.drop.p == 0.1  # Switch's 0.1 outside the experts
    before = [m.router.gate.weight.clone() for m in layers]
    trainer.fit()
    for layer, w in zip(layers, before):
        assert torch.equal(layer.router.gate.weight, w)
    others = [p for n, p in trainer.model.named_parameters() if "router" not in n]
    assert all(p.requires_grad for p in others)


def test_distillation_loss_follows_its_formula_and_schedule(pretrained, tmp_path):
    teacher = pretrained
    cfg = apply_overrides(
        get_recipe("lm-moe-test"),
        [
            f"distill.teacher={teacher}",
            "distill.weight=0.8",
            "distill.until=8",
            "distill.schedule=linear",
            "distill.temperature=2",
            "train.steps=10",
            "train.log_every=1",
            "model.n_layers=3",  # a larger student, as knowledge inheritance grows a model
        ],
    )
    trainer = Trainer(cfg, tmp_path / "student", progress=False)
    batch = trainer.sampler.next_batch()  # the step-1 loss by hand, from a copy of the state
    trainer.sampler.load_state_dict({**trainer.sampler.state_dict(), "next_batch": 0})
    logits = trainer.model(batch.x)
    with torch.no_grad():
        teacher_logits = load_run(teacher).model(batch.x)
    ce = F.cross_entropy(logits.flatten(0, 1), batch.y.flatten())
    kd = distill_loss(logits, teacher_logits, 2.0)
    objective, logs = trainer.task.loss(trainer.model, batch, 1)
    assert objective.item() == pytest.approx((0.2 * ce + 0.8 * kd).item(), rel=1e-5)
    assert logs["kd"].item() == pytest.approx(kd.item(), rel=1e-5)
    trainer.fit()
    rows = [r for r in metric_rows(tmp_path / "student") if "loss" in r]
    for r in rows:
        w = kd_weight(r["step"], 0.8, 8, "linear")
        if w:
            assert r["kd_weight"] == pytest.approx(w)
            mixed = (1 - w) * r["ce"] + w * r["kd"]
            assert r["loss"] - r["aux"] == pytest.approx(mixed, rel=1e-5)
        else:  # after the schedule ends the teacher is not even run
            assert "kd" not in r and math.isclose(r["loss"] - r["aux"], r["ce"], rel_tol=1e-5)
    assert [r["step"] for r in rows if "kd" not in r] == [9, 10]


def test_cli_fine_tunes_and_bad_input_is_one_line(pretrained, tmp_path, cli):
    out = tmp_path / "cli"
    code, stdout, stderr = cli(
        "finetune", "--run", str(pretrained), "--task", "fortune", "--out", str(out),
        "--no-progress", *[a for s in SMALL for a in ("--set", s)],
    )  # fmt: skip
    assert code == 0, stderr
    assert "test (" in stdout and "accuracy" in stdout
    test = json.loads((out / "test.json").read_text())
    assert test["step"] == 12 and 0 <= test["val_acc"] <= 1
    code, stdout, stderr = cli("eval", "--run", str(out))
    assert code == 0, stderr
    assert f"test loss {test['val_loss']:.4f}, accuracy {test['val_acc']:.4f}" in stdout
    code, _, stderr = cli("finetune", "--run", str(tmp_path / "nope"), "--task", "fortune")
    assert code == 2
    assert stderr.strip().count("\n") == 0 and "finetune.init=" in stderr
    code, _, stderr = cli("finetune", "--run", str(pretrained), "--task", "imdb")
    assert code == 2 and "invalid choice: 'imdb'" in stderr
    with pytest.raises(ConfigError, match="must share the student's tokenizer"):
        load_teacher(pretrained, vocab_size=300)


def test_a_student_starts_from_its_teachers_layers_and_staged_kd_stops(pretrained, tmp_path, cli):
    cfg = student_config(pretrained, 1, ["train.steps=4", "train.log_every=1"], kd_fraction=0.5)
    assert cfg.distill.until == 2 and cfg.model.n_layers == 1
    trainer = Trainer(cfg, tmp_path / "student", progress=False)
    teacher = load_run(pretrained).model.state_dict()
    student = trainer.model.state_dict()
    assert any(k.startswith("blocks.1.") for k in teacher)
    assert not any(k.startswith("blocks.1.") for k in student)
    assert trainer.task.inherited == sorted(student)  # every student tensor is the teacher's
    for name in trainer.task.inherited:
        assert torch.equal(student[name], teacher[name]), name
    trainer.fit()
    rows = [r for r in metric_rows(tmp_path / "student") if "loss" in r]
    assert ["kd" in r for r in rows] == [True, True, False, False]
    code, _, stderr = cli("distill", "--teacher", str(pretrained), "--student-layers", "0")
    assert code == 2 and "--student-layers=0 must be an int >= 1" in stderr


def test_the_trainer_passes_each_rows_domain_to_task_routers(tmp_path):
    # two domains; with the task router every token of a domain goes to that domain's top-k
    # experts, so each step's domain-by-expert counts have k experts per domain in the batch
    docs = [Document(f"{d}/{i}", (d * 40 + str(i)) * 8, d) for d in ("ab", "xy") for i in range(6)]
    tok = ByteTokenizer()
    domains = ["ab", "xy"]
    data = PreparedData(
        tokenizer=tok,
        train=TokenStream.from_documents(docs[:5] + docs[6:11], tok, domains=domains),
        val=TokenStream.from_documents([docs[5], docs[11]], tok, domains=domains),
    )
    cfg = apply_overrides(
        get_recipe("lm-moe-test"),
        [
            "model.moe.router=task",
            "model.moe.router_options.num_tasks=2",
            "model.moe.top_k=2",
            "train.steps=6",
            "train.log_every=1",
            "data.eval_batches=1",
        ],
    )
    trainer = Trainer(cfg, tmp_path / "task", progress=False, data=data)
    trainer.fit()
    rows = [json.loads(line) for line in (tmp_path / "task" / "routing.jsonl").open()]
    assert len(rows) == 6
    for row in rows:
        experts = [sum(c > 0 for c in counts) for counts in row["affinity"]]
        assert all(n in (0, 2) for n in experts) and sum(experts) >= 2, row["affinity"]
    narrow = apply_overrides(cfg, ["model.moe.router_options.num_tasks=1"])
    with pytest.raises(ConfigError, match="num_tasks=1 must be >= the corpus's 2 domains"):
        Trainer(narrow, tmp_path / "narrow", progress=False, data=data)
