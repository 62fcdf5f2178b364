"""TaskMoE extraction: the sub-network equals the full model for its task, holds only its
experts, and refuses what no sub-network can equal."""

import dataclasses

import pytest
import torch

import moesaic as ms
from moesaic.cli import extract as extract_cli
from moesaic.data import build_tokenizer
from moesaic.inference import extract, task_experts
from moesaic.models.lm import LMConfig, MoELM
from moesaic.train.recipes import get_recipe
from moesaic.train.run import load_run, write_run


def _task_model(top_k=2, activation="gelu", shared_d_ff=0, num_tasks=3, **moe):
    cfg = LMConfig(
        vocab_size=64,
        max_seq_len=32,
        d_model=16,
        n_layers=4,
        n_heads=2,
        d_ff=24,
        activation=activation,
        moe=ms.MoEConfig(
            num_experts=8,
            top_k=top_k,
            router="task",
            shared_d_ff=shared_d_ff,
            router_options={"num_tasks": num_tasks},
            **{"capacity_factor": None, **moe},
        ),
        moe_every=2,
    )
    model = MoELM(cfg).eval()
    for layer in (b.ffn for b in model.blocks if isinstance(b.ffn, ms.MoE)):
        torch.nn.init.normal_(layer.router.task_embedding.weight)  # tasks pick different experts
        torch.nn.init.normal_(layer.router.gate.weight)
    return model


@pytest.mark.parametrize(
    "kw", [{}, {"activation": "swiglu", "shared_d_ff": 8}, {"top_k": 3}], ids=str
)
def test_extracted_model_equals_the_full_model_for_every_task(kw):
    model = _task_model(**kw)
    idx = torch.randint(0, 64, (3, 20))
    for task in range(3):
        with ms.routing_context(task=task):
            full = model(idx)
        torch.testing.assert_close(extract(model, task)(idx), full, rtol=1e-5, atol=1e-5)


def test_extracted_model_holds_only_the_task_experts_with_their_gate_weights():
    model = _task_model()
    sub = extract(model, 1)
    assert sub.cfg.moe is None and sub.cfg.matched_d_ff == 2 * 24
    layer = model.blocks[1].ffn
    experts, weights = task_experts(layer, 1)
    assert len(experts) == 2 and abs(sum(weights) - 1) < 1e-6  # topk renormalises its two
    ffn = sub.blocks[1].ffn
    torch.testing.assert_close(ffn.w1.weight[:24], layer.experts.w1[experts[0]].t())
    torch.testing.assert_close(ffn.w2.weight[:, 24:], weights[1] * layer.experts.w2[experts[1]].t())
    # PAPERS: dense model + one extra expert per MoE layer (k=2), minus the routers
    dense = MoELM(dataclasses.replace(model.cfg, moe=None))
    n = sum(p.numel() for p in sub.parameters())
    assert n == sum(p.numel() for p in dense.parameters()) + 2 * (2 * 16 * 24)


def test_a_task_keeping_one_expert_gets_that_expert_as_a_plain_ffn():
    model = _task_model(top_k=1)
    sub = extract(model, 2)
    (e,), (g,) = task_experts(model.blocks[3].ffn, 2)
    assert sub.cfg.matched_d_ff == 24
    torch.testing.assert_close(sub.blocks[3].ffn.w1.weight, model.blocks[3].ffn.experts.w1[e].t())
    x = torch.randn(5, 16)
    ref = g * model.blocks[3].ffn.experts(x, [5 if i == e else 0 for i in range(8)])
    torch.testing.assert_close(sub.blocks[3].ffn(x), ref)


@pytest.mark.parametrize(
    "make,task,message",
    [
        (lambda: _task_model(), 3, "task=3 must be in [0, num_tasks=3)"),
        (lambda: _task_model(), "code", "task='code' must be an int task id"),
        (lambda: _task_model(capacity_factor=1.0), 0, "capacity_factor=1.0"),
        (lambda: ms.models.create("lm-moe-test"), 0, "needs a task-level router"),
    ],
)
def test_bad_extractions_fail_with_one_clear_line(make, task, message):
    with pytest.raises((ValueError, TypeError)) as err:
        extract(make(), task)
    assert message in str(err.value) and "\n" not in str(err.value)


def _task_run(tmp_path):
    cfg = get_recipe("lm-taskmoe")
    model_cfg = dataclasses.replace(
        cfg.model, d_model=16, d_ff=32, n_layers=2, max_seq_len=64, moe=_task_model().cfg.moe
    )
    model_cfg = dataclasses.replace(
        model_cfg,
        moe=dataclasses.replace(model_cfg.moe, router_options={"num_tasks": 6}),
    )
    data = dataclasses.replace(cfg.data, seq_len=32, batch_size=2, eval_batches=1)
    cfg = dataclasses.replace(cfg, model=model_cfg, data=data)
    tokenizer = build_tokenizer("byte")
    model = MoELM(dataclasses.replace(model_cfg, vocab_size=tokenizer.vocab_size))
    write_run(tmp_path / "task", cfg, model, tokenizer, step=7)
    return tmp_path / "task", model


def test_cli_extract_writes_a_run_that_eval_and_generate_accept(tmp_path, capsys):
    from moesaic.cli import eval as eval_cli
    from moesaic.cli import generate as generate_cli

    run, model = _task_run(tmp_path)
    out = tmp_path / "bible"
    assert extract_cli.main(["--run", str(run), "--task", "bible", "--out", str(out)]) == 0
    loaded = load_run(out)
    assert loaded.step == 7 and loaded.cfg.model.moe is None
    idx = torch.randint(0, 256, (2, 16))
    with ms.routing_context(task=extract_cli.task_names("mixture").index("bible")):
        torch.testing.assert_close(loaded.model(idx), model.eval()(idx), rtol=1e-5, atol=1e-5)
    assert eval_cli.main(["--run", str(out)]) == 0
    assert generate_cli.main(["--run", str(out), "--prompt", "In", "--max-new-tokens", "4"]) == 0
    assert "validation loss" in capsys.readouterr().out


def test_cli_extract_refuses_an_unknown_task_naming_the_valid_ones(tmp_path, capsys):
    run, _ = _task_run(tmp_path)
    code = extract_cli.main(["--run", str(run), "--task", "poetry", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "--task='poetry' is not one of ['bible', 'code', 'docs'" in err
    assert not (tmp_path / "o").exists()


def test_the_extracted_model_generates_what_the_full_model_generates_for_its_task():
    from moesaic.inference import generate_batch

    model, prompts = _task_model(), [[1, 2, 3], [9]]
    kw = {"temperature": 1.0, "seed": 4}
    assert generate_batch(model, prompts, 8, task=2, **kw) == generate_batch(
        extract(model, 2), prompts, 8, **kw
    )
