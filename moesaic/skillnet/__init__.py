"""SkillNet's tasks, joint training and evaluation (the model is ``moesaic.models.skillnet``).

>>> from moesaic import skillnet
>>> data = skillnet.load_task_data(preset="smoke")
>>> model = ms.models.create("skillnet-tiny")
>>> skillnet.train_skillnet(model, data, skillnet.SkillNetRecipe(steps=300))
>>> skillnet.evaluate(model, data)          # {"text_cls": {"accuracy": ...}, "t2c": {"R@1": ...}}
"""

from moesaic.skillnet.tasks import PRESETS, TaskData, load_task_data
from moesaic.skillnet.train import SkillNetRecipe, chance, evaluate, task_loss, train_skillnet

__all__ = [
    "PRESETS",
    "SkillNetRecipe",
    "TaskData",
    "chance",
    "evaluate",
    "load_task_data",
    "task_loss",
    "train_skillnet",
]
