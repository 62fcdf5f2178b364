"""SkillNet against its dense baselines on the same data and steps, and the skill-by-task map.

Models compared (all with the same activated parameters per input):
- ``skillnet``: one skill per modality at the configured sites, all tasks jointly;
- ``dense-multitask``: every site shared by all modalities, all tasks jointly;
- ``dense-single``: one dense model per task, trained on that task alone (the per-task
  specialists; SkillNet's "modality-specific models").
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from moesaic.models.registry import create
from moesaic.models.skillnet import SkillNet
from moesaic.skillnet.tasks import TaskData
from moesaic.skillnet.train import SkillNetRecipe, chance, evaluate, train_skillnet

__all__ = ["compare", "skill_matrix", "plot_skill_heatmap", "comparison_table"]

HEADLINE = {"classify": "accuracy", "retrieve": "R@1"}


def _train(name: str, tasks: dict, data: dict[str, TaskData], recipe: SkillNetRecipe, **kw):
    torch.manual_seed(recipe.seed)
    model = create(name, tasks=tasks, **kw)
    train_skillnet(model, data, recipe)
    return model, evaluate(model, data)


def compare(
    data: dict[str, TaskData], recipe: SkillNetRecipe, out_dir: str | Path, **model_overrides
) -> dict:
    """Train the three kinds of model; write ``compare.json``, ``compare.md`` and (with
    matplotlib) ``skills.png`` to ``out_dir``; return the results."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks = {t: v for t, v in create("skillnet-tiny").cfg.tasks.items() if t in data}
    skill, skill_metrics = _train("skillnet-tiny", tasks, data, recipe, **model_overrides)
    _, dense_metrics = _train("skillnet-dense-tiny", tasks, data, recipe)
    single = {}
    for t in data:
        _, m = _train("skillnet-dense-tiny", {t: tasks[t]}, {t: data[t]}, recipe)
        single[t] = m[t]
    result = {
        "metrics": {"skillnet": skill_metrics, "dense-multitask": dense_metrics,
                    "dense-single": single, "chance": chance(data)},
        "params": {t: dict(zip(("total", "activated"), skill.parameter_counts(t))) for t in data},
        "skills": {t: skill.skill_usage(t) for t in data},
    }  # fmt: skip
    (out_dir / "compare.json").write_text(json.dumps(result, indent=2))
    (out_dir / "compare.md").write_text(comparison_table(result, data) + "\n")
    try:
        plot_skill_heatmap(skill, out_dir / "skills.png")
    except ImportError:
        pass  # the plot needs the `plot` extra; the table does not
    return result


def comparison_table(result: dict, data: dict[str, TaskData]) -> str:
    """Markdown: one row per task with each model's headline metric."""
    models = ("skillnet", "dense-multitask", "dense-single", "chance")
    lines = ["| task | metric | " + " | ".join(models) + " | activated / total params |"]
    lines.append("|---" * (len(models) + 3) + "|")
    for t, d in data.items():
        metric = HEADLINE[d.kind]
        cells = " | ".join(f"{result['metrics'][m][t][metric]:.3f}" for m in models)
        p = result["params"][t]
        lines.append(f"| {t} | {metric} | {cells} | {p['activated']:,} / {p['total']:,} |")
    return "\n".join(lines)


def skill_matrix(model: SkillNet) -> tuple[list[str], list[str], torch.Tensor]:
    """(skills, tasks, (skills, tasks) 0/1 matrix of which skill each task activates)."""
    skills, tasks = list(model.cfg.skills), list(model.cfg.tasks)
    m = torch.zeros(len(skills), len(tasks))
    for j, t in enumerate(tasks):
        for s in model.skill_usage(t):
            m[skills.index(s), j] = 1
    return skills, tasks, m


def plot_skill_heatmap(model: SkillNet, path: str | Path) -> None:
    """Skill-by-task activation heatmap as a PNG (needs matplotlib: pip install moesaic[plot])."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("the skill heatmap needs matplotlib: pip install moesaic[plot]") from None
    skills, tasks, m = skill_matrix(model)
    fig, ax = plt.subplots(figsize=(1 + 0.9 * len(tasks), 1 + 0.5 * len(skills)))
    ax.imshow(m.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
    ax.set_yticks(range(len(skills)), skills)
    ax.set_title("skills activated per task")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
