"""SkillNet end to end: sparse pretraining then joint fine-tuning trains every task past chance;
the CLI round-trips."""

import json

import pytest
import torch

import moesaic as ms
from moesaic import skillnet as sk
from moesaic.cli.main import main
from tests.integration.conftest import FINETUNE

HEADLINE = {"classify": "accuracy", "retrieve": "R@5"}


@pytest.fixture
def data_dir(skillnet_data_dir):
    return skillnet_data_dir


def test_pretrained_then_finetuned_beats_chance_on_every_task(
    skillnet_smoke, skillnet_pretrained, one_thread
):
    # the smoke recipe's two phases on the smoke data, shortened (conftest.py): the session's
    # sparse pretraining, then joint fine-tuning on every task
    data, _ = skillnet_smoke
    torch.manual_seed(0)
    model = ms.models.create("skillnet-tiny")
    model.load_state_dict(skillnet_pretrained[0])
    sk.train_skillnet(model, data, sk.SkillNetRecipe(**FINETUNE))
    result, chance = sk.evaluate(model, data), sk.chance(data)
    for task, d in data.items():
        metric = HEADLINE[d.kind]
        # at least twice what a random ranking / the majority class scores
        assert result[task][metric] > 2 * chance[task][metric] or (
            d.kind == "classify" and result[task][metric] > chance[task][metric] + 0.05
        ), (task, result[task], chance[task])


def test_cli_trains_evaluates_and_retrieves(tmp_path, data_dir, capsys):
    run = tmp_path / "run"
    args = ["skillnet", "train", "--run", str(run), "--steps", "2", "--batch-size", "4"]
    args += ["--pretrain-steps", "3"]
    args += ["--tasks", "text_cls,t2i_zh", "--skill-sites", "ffn,attn_qkv"]
    assert main(args + ["--data-dir", str(data_dir)]) == 0
    for name in ("config.json", "model.safetensors", "metrics.jsonl", "eval.json", "report.md"):
        assert (run / name).is_file()
    phases = [
        json.loads(line)["phase"] for line in (run / "metrics.jsonl").read_text().splitlines()
    ]
    assert phases == ["pretrain"] * 3 + ["finetune"] * 2
    written = json.loads((run / "eval.json").read_text())
    assert set(written["metrics"]) == {"text_cls", "t2i_zh"}
    assert written["params"]["text_cls"]["skills"] == ["text"]
    assert written["params"]["t2i_zh"]["skills"] == ["text", "image"]
    capsys.readouterr()
    assert main(["skillnet", "eval", "--run", str(run)]) == 0
    # the reloaded weights reproduce the training run's evaluation exactly
    assert json.loads((run / "eval.json").read_text())["metrics"] == written["metrics"]
    assert main(["skillnet", "retrieve", "--run", str(run), "--task", "t2i_zh",
                 "--query", "三十七", "--top", "3"]) == 0  # fmt: skip
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) - lines.index(next(x for x in lines if x.startswith("1. "))) == 3
    assert main(["skillnet", "retrieve", "--run", str(run), "--task", "text_cls",
                 "--query", "x"]) == 2  # fmt: skip
    assert "not one of this run's retrieval tasks" in capsys.readouterr().err


def test_compare_writes_the_table_and_the_skill_heatmap(tmp_path, data_dir, capsys):
    out = tmp_path / "cmp"
    args = ["skillnet", "compare", "--out", str(out), "--steps", "2", "--batch-size", "4"]
    args += ["--pretrain-steps", "0", "--workers", "1"]
    assert main(args + ["--tasks", "sound_cls,t2v", "--data-dir", str(data_dir)]) == 0
    result = json.loads((out / "compare.json").read_text())
    assert set(result["metrics"]) == {"skillnet", "dense-multitask", "dense-single", "chance"}
    assert set(result["metrics"]["dense-single"]) == {"sound_cls", "t2v"}
    assert result["skills"] == {"sound_cls": ["sound"], "t2v": ["text", "video"]}
    table = (out / "compare.md").read_text().splitlines()
    assert len(table) == 2 + 2 + 1 and table[2].startswith("| sound_cls | accuracy |")
    assert table[-1].startswith("| mean |")
    assert (out / "skills.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_skill_matrix_marks_each_tasks_skills():
    from moesaic.skillnet.compare import skill_matrix

    skills, tasks, m = skill_matrix(ms.models.create("skillnet-tiny", general_skill=True))
    assert skills == ["text", "image", "sound", "video", "code", "general"]
    expected = {  # hand-written from the task definitions, plus the always-on general skill
        "text_cls": {"text"}, "sound_cls": {"sound"}, "t2i_en": {"text", "image"},
        "t2i_zh": {"text", "image"}, "t2v": {"text", "video"}, "t2c": {"text", "code"},
    }  # fmt: skip
    for j, t in enumerate(tasks):
        on = {skills[i] for i in range(len(skills)) if m[i, j] == 1}
        assert on == expected[t] | {"general"}
