"""SkillNet against its dense baselines on the same data and steps, and the skill-by-task map.

Models (``MODELS``; the ``-pretrained`` ones get the same sparse self-supervised pretraining,
``moesaic.skillnet.pretrain``, data and steps, before the same fine-tuning):
- ``skillnet``, ``skillnet-pretrained``: one skill per modality at the configured sites, all
  tasks jointly;
- ``dense-multitask``, ``dense-multitask-pretrained``: every site shared by all modalities, all
  tasks jointly: the same parameters activated per input as SkillNet;
- ``dense-wide``, ``dense-wide-pretrained`` (not run by default): the dense multitask model with
  an FFN as wide as all of SkillNet's FFN skills together (``d_ff`` times the number of skills):
  SkillNet's total parameters, all of them active;
- ``dense-single``: one dense model per task, trained on that task alone (the per-task
  specialists; SkillNet's "modality-specific models").

The models are independent, so ``workers`` processes train them side by side (spawned, each
with ``cpu_count / workers`` threads); every model's result is the same as in a serial run.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from moesaic.models.registry import create
from moesaic.skillnet.model import SkillNet
from moesaic.skillnet.pretrain import pretrain_skillnet
from moesaic.skillnet.pretrain_data import PretrainData
from moesaic.skillnet.tasks import TaskData
from moesaic.skillnet.train import SkillNetRecipe, chance, evaluate, train_skillnet

__all__ = [
    "MODELS", "DEFAULT_MODELS", "compare", "train_one", "comparison_table", "headline_mean",
    "skill_matrix", "plot_skill_heatmap",
]  # fmt: skip

HEADLINE = {"classify": "accuracy", "retrieve": "R@1"}
MODELS = ("skillnet-pretrained", "skillnet", "dense-multitask-pretrained", "dense-multitask",
          "dense-wide-pretrained", "dense-wide", "dense-single")  # fmt: skip
DEFAULT_MODELS = tuple(m for m in MODELS if not m.startswith("dense-wide"))
_BASE = {"skillnet": "skillnet-tiny", "dense-multitask": "skillnet-dense-tiny",
         "dense-wide": "skillnet-dense-tiny", "dense-single": "skillnet-dense-tiny"}  # fmt: skip


def train_one(
    name: str,
    tasks: dict,
    data: dict[str, TaskData],
    recipe: SkillNetRecipe,
    pretrain: tuple[SkillNetRecipe, PretrainData] | None = None,
    threads: int | None = None,
    overrides: dict | None = None,
) -> dict:
    """Build registered model ``name`` for ``tasks``, pretrain it (if given), train it on
    ``data``; return its test metrics."""
    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(recipe.seed)
    model = create(name, tasks=tasks, **(overrides or {}))
    if pretrain is not None:
        pretrain_skillnet(model, pretrain[1], pretrain[0])
    train_skillnet(model, data, recipe)
    return evaluate(model, data)


def _overrides(model: str, skill_overrides: dict) -> dict:
    if model.startswith("skillnet"):
        return dict(skill_overrides)
    if model.startswith("dense-wide"):
        skill = create("skillnet-tiny", **skill_overrides).cfg
        return {"d_ff": skill.d_ff * len(skill.skills)}
    return {}


def compare(
    data: dict[str, TaskData],
    recipe: SkillNetRecipe,
    out_dir: str | Path,
    pretrain: tuple[SkillNetRecipe, PretrainData] | None = None,
    workers: int = 1,
    progress: bool = True,
    models: tuple[str, ...] = DEFAULT_MODELS,
    **model_overrides,
) -> dict:
    """Train ``models`` (see the module docstring; the pretrained ones only with ``pretrain``)
    on ``data``; write ``compare.json``, ``compare.md`` and (with matplotlib) ``skills.png`` to
    ``out_dir``; return the results (``metrics``, ``params`` per model and task, ``skills``)."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers={workers!r} must be an int >= 1")
    for m in models:
        if m not in MODELS:
            raise ValueError(f"models: {m!r} is not one of {MODELS}")
    if pretrain is None:
        models = tuple(m for m in models if not m.endswith("-pretrained"))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks = {t: v for t, v in create("skillnet-tiny").cfg.tasks.items() if t in data}
    jobs, built, cost = {}, {}, {}
    for m in models:
        kind = m.removesuffix("-pretrained")
        kw = _overrides(m, model_overrides)
        built[kind] = create(_BASE[kind], tasks=tasks, **kw)
        if m == "dense-single":
            for t in data:
                jobs[f"{m}/{t}"] = (_BASE[kind], {t: tasks[t]}, {t: data[t]}, recipe, None, kw)
        else:
            pre = pretrain if m.endswith("-pretrained") else None
            jobs[m] = (_BASE[kind], tasks, data, recipe, pre, kw)
    for key, job in jobs.items():
        # relative cost: parameters activated over the job's tasks (each step runs every task
        # once), about 2.5 times that with pretraining (which runs more passes per step)
        model = built[key.split("/")[0].removesuffix("-pretrained")]
        active = sum(model.parameter_counts(t)[1] for t in job[1])
        cost[key] = active * (2.5 if job[4] is not None else 1)
    metrics = _run_jobs(jobs, workers, progress, cost)
    result: dict = {"metrics": {}, "params": {}}
    for m in models:
        if m == "dense-single":
            result["metrics"][m] = {t: metrics[f"{m}/{t}"][t] for t in data}
        else:
            result["metrics"][m] = metrics[m]
    result["metrics"]["chance"] = chance(data)
    for kind, model in built.items():
        counts = {t: model.parameter_counts(t) for t in data}
        if kind == "dense-single":  # a specialist holds only its own task's front-ends and head
            counts = {t: (active, active) for t, (_, active) in counts.items()}
        result["params"][kind] = {
            t: dict(zip(("total", "activated"), c)) for t, c in counts.items()
        }
    if "skillnet" in built:
        skill = built["skillnet"]
    else:
        skill = create("skillnet-tiny", tasks=tasks, **model_overrides)
    result["skills"] = {t: skill.skill_usage(t) for t in data}
    result["recipe"] = {"finetune": vars(recipe), "pretrain": pretrain and vars(pretrain[0])}
    (out_dir / "compare.json").write_text(json.dumps(result, indent=2))
    (out_dir / "compare.md").write_text(comparison_table(result, data) + "\n")
    try:
        plot_skill_heatmap(skill, out_dir / "skills.png")
    except ImportError:
        pass  # the plot needs the `plot` extra; the table does not
    return result


def _convert(obj, leaf: type, fn):
    """``obj`` with ``fn`` applied to every ``leaf`` inside its dicts, tuples, lists and data
    classes (``TaskData``, ``PretrainData``)."""
    if isinstance(obj, leaf):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _convert(v, leaf, fn) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_convert(v, leaf, fn) for v in obj)
    if isinstance(obj, (TaskData, PretrainData)):
        fields = (getattr(obj, f.name) for f in dataclasses.fields(obj))
        return type(obj)(*(_convert(v, leaf, fn) for v in fields))
    return obj


def _arrays(obj):
    """``obj`` with every tensor as a numpy array, so it is pickled by value: tensors sent to a
    spawned worker go through torch's shared-memory handles, which measured corrupted inputs
    in the workers and a crashed parent with the default preset's data."""
    return _convert(obj, torch.Tensor, torch.Tensor.numpy)


def _train_from_arrays(job: tuple, threads: int) -> dict:
    name, tasks, data, recipe, pretrain, overrides = _convert(job, np.ndarray, torch.from_numpy)
    return train_one(name, tasks, data, recipe, pretrain, threads, overrides)


def _run_jobs(
    jobs: dict[str, tuple], workers: int, progress: bool, cost: dict[str, float]
) -> dict[str, dict]:
    bar = tqdm(total=len(jobs), desc="skillnet compare", unit="model", disable=not progress,
               miniters=1)  # fmt: skip
    out = {}
    if workers == 1:
        for key, (name, tasks, data, recipe, pre, kw) in jobs.items():
            out[key] = train_one(name, tasks, data, recipe, pre, overrides=kw)
            bar.update()
    else:
        threads = max(1, (os.cpu_count() or 1) // workers)
        ctx = multiprocessing.get_context("spawn")  # never fork a process holding OpenMP threads
        # the biggest jobs first, so no worker is left with a long job at the end
        order = sorted(jobs, key=lambda k: -cost[k])
        with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            futures = {k: pool.submit(_train_from_arrays, _arrays(jobs[k]), threads) for k in order}
            for f in as_completed(futures.values()):
                f.result()  # raises a worker's error here
                bar.update()
            out = {k: f.result() for k, f in futures.items()}
    bar.close()
    return out


def comparison_table(result: dict, data: dict[str, TaskData]) -> str:
    """Markdown: one row per task with each model's headline metric and the parameters each
    kind of model activates for the task (both sides of a retrieval pair), then the means."""
    models = [m for m in MODELS if m in result["metrics"]] + ["chance"]
    kinds = list(result["params"])
    lines = ["| task | metric | " + " | ".join(models) + " | "
             + " | ".join(f"{k} activated / total" for k in kinds) + " |"]  # fmt: skip
    lines.append("|---" * (len(models) + len(kinds) + 2) + "|")
    for t, d in data.items():
        metric = HEADLINE[d.kind]
        cells = " | ".join(f"{result['metrics'][m][t][metric]:.3f}" for m in models)
        p = " | ".join(
            f"{result['params'][k][t]['activated']:,} / {result['params'][k][t]['total']:,}"
            for k in kinds
        )
        lines.append(f"| {t} | {metric} | {cells} | {p} |")
    means = " | ".join(f"{headline_mean(result, m, data):.3f}" for m in models)
    lines.append(f"| mean | | {means} |" + " |" * len(kinds))
    return "\n".join(lines)


def headline_mean(result: dict, model: str, data: dict[str, TaskData]) -> float:
    """``model``'s headline metric (accuracy or R@1) averaged over the tasks."""
    values = [result["metrics"][model][t][HEADLINE[d.kind]] for t, d in data.items()]
    return sum(values) / len(values)


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
