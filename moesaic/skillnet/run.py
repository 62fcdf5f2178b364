"""A SkillNet run directory: config.json, model.safetensors, metrics.jsonl (pretraining and
fine-tuning steps, each with its ``phase``), eval.json, report.md.

``train_run`` trains and evaluates one model and writes all of it; ``load_run`` rebuilds the
model and its data from the directory.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from moesaic.models.registry import create
from moesaic.skillnet.model import SkillNet, SkillNetConfig
from moesaic.skillnet.pretrain import pretrain_skillnet
from moesaic.skillnet.pretrain_data import load_pretrain_data
from moesaic.skillnet.tasks import TaskData, load_task_data
from moesaic.skillnet.train import SkillNetRecipe, chance, evaluate, train_skillnet

__all__ = ["train_run", "load_run", "format_table"]


def _config_dict(cfg: SkillNetConfig) -> dict:
    out = dataclasses.asdict(cfg)
    out["skill_sites"] = sorted(cfg.skill_sites)
    out["tasks"] = {k: list(v) for k, v in cfg.tasks.items()}
    return out


def train_run(
    run_dir: str | Path,
    *,
    model_name: str = "skillnet-tiny",
    model_overrides: dict | None = None,
    recipe: SkillNetRecipe | None = None,
    pretrain: SkillNetRecipe | None = None,
    preset: str = "smoke",
    tasks: tuple[str, ...] | None = None,
    data_dir: str | Path | None = None,
    log: Callable[[dict], None] | None = None,
) -> dict:
    """Train ``model_name`` on ``tasks`` at data ``preset`` (after sparse pretraining on the
    preset's pretraining data when ``pretrain`` is given); write the run; return eval.json."""
    recipe = recipe or SkillNetRecipe()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    data = load_task_data(tasks, preset, recipe.seed, data_dir)
    overrides = dict(model_overrides or {})
    overrides.setdefault(
        "tasks", {t: v for t, v in _default_tasks(model_name).items() if t in data}
    )
    torch.manual_seed(recipe.seed)
    model = create(model_name, **overrides)
    config = {
        "model": _config_dict(model.cfg),
        "recipe": dataclasses.asdict(recipe),
        "pretrain": None if pretrain is None else dataclasses.asdict(pretrain),
        "preset": preset,
        "tasks": list(data),
        "data_dir": None if data_dir is None else str(data_dir),
    }
    (run_dir / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    with open(run_dir / "metrics.jsonl", "w") as f:

        def logger(phase: str) -> Callable[[dict], None]:
            def write(record: dict) -> None:
                record = {"phase": phase, **record}
                f.write(json.dumps(record) + "\n")
                if log is not None:
                    log(record)

            return write

        if pretrain is not None:
            pdata = load_pretrain_data(data, preset, recipe.seed, data_dir, model.cfg.image_size)
            pretrain_skillnet(model, pdata, pretrain, logger("pretrain"))
        train_skillnet(model, data, recipe, logger("finetune"))
    # safetensors stores row-major tensors only (expert weights are kept transposed in memory)
    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(run_dir / "model.safetensors"))
    return evaluate_run(run_dir, model, data)


def evaluate_run(run_dir: Path, model: SkillNet, data: dict[str, TaskData], split: str = "test"):
    """Evaluate, count parameters, write eval.json and report.md; return the eval dict."""
    result = {
        "split": split,
        "metrics": evaluate(model, data, split),
        "chance": chance(data, split),
    }
    result["params"] = {}
    for task in data:
        total, active = model.parameter_counts(task)
        result["params"][task] = {
            "total": total,
            "activated": active,
            "skills": model.skill_usage(task),
        }
    Path(run_dir, "eval.json").write_text(json.dumps(result, indent=2))
    Path(run_dir, "report.md").write_text(format_table(result) + "\n")
    return result


def format_table(result: dict) -> str:
    """A markdown table: task, metric, model, chance, activated / total parameters, skills."""
    lines = [
        "| task | metric | model | chance | activated params | total params | skills |",
        "|---|---|---|---|---|---|---|",
    ]
    for task, metrics in result["metrics"].items():
        p = result["params"][task]
        for name, value in metrics.items():
            lines.append(
                f"| {task} | {name} | {value:.3f} | {result['chance'][task][name]:.3f} | "
                f"{p['activated']:,} | {p['total']:,} | {'+'.join(p['skills'])} |"
            )
    return "\n".join(lines)


def load_run(run_dir: str | Path) -> tuple[SkillNet, dict[str, TaskData], dict]:
    """(model with the run's weights, the run's data, its config.json)."""
    run_dir = Path(run_dir)
    path = run_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a SkillNet run directory: {path} is missing")
    config = json.loads(path.read_text())
    mcfg = dict(config["model"])
    mcfg["tasks"] = {k: tuple(v) for k, v in mcfg["tasks"].items()}
    model = SkillNet(SkillNetConfig(**mcfg))
    model.load_state_dict(load_file(str(run_dir / "model.safetensors")))
    recipe = config["recipe"]
    data = load_task_data(
        tuple(config["tasks"]), config["preset"], recipe["seed"], config["data_dir"]
    )
    return model.eval(), data, config


def _default_tasks(model_name: str) -> dict:
    from moesaic.models.registry import model_config

    return model_config(model_name).tasks
