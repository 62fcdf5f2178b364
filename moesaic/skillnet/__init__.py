"""SkillNet, the application: model (``model``, ``parts``), data (``data``, ``tasks``,
``pretrain_data``), sparse pretraining, joint training and evaluation, and the
``moesaic skillnet`` command (``cli``). The core never imports this package; the model registry
imports ``moesaic.skillnet.model`` when a ``skillnet-*`` model is asked for.

>>> from moesaic import skillnet
>>> data = skillnet.load_task_data(preset="smoke")
>>> model = ms.models.create("skillnet-tiny")
>>> pre = skillnet.load_pretrain_data(data, preset="smoke")        # unlabelled + image-text
>>> skillnet.pretrain_skillnet(model, pre, skillnet.SkillNetRecipe(steps=300))   # sparse
>>> skillnet.train_skillnet(model, data, skillnet.SkillNetRecipe(steps=300))
>>> skillnet.evaluate(model, data)          # {"text_cls": {"accuracy": ...}, "t2c": {"R@1": ...}}
"""

from moesaic.skillnet.model import SkillNet, SkillNetConfig
from moesaic.skillnet.pretrain import pretrain_skillnet
from moesaic.skillnet.pretrain_data import PretrainData, load_pretrain_data
from moesaic.skillnet.tasks import PRESET_STEPS, PRESETS, TaskData, load_task_data
from moesaic.skillnet.train import SkillNetRecipe, chance, evaluate, task_loss, train_skillnet

__all__ = [
    "PRESETS",
    "PRESET_STEPS",
    "PretrainData",
    "SkillNet",
    "SkillNetConfig",
    "SkillNetRecipe",
    "TaskData",
    "chance",
    "evaluate",
    "load_pretrain_data",
    "load_task_data",
    "pretrain_skillnet",
    "task_loss",
    "train_skillnet",
]
