"""The core never imports an application package (DESIGN.md, package layout): importing,
building and training with moesaic leaves ``moesaic.skillnet`` unloaded until a SkillNet model or
command is asked for."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _loaded_after(code: str, cwd: Path = ROOT) -> list[str]:
    probe = code + "\nimport sys\nprint(sorted(m for m in sys.modules if 'skillnet' in m))"
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=cwd, capture_output=True, text=True, check=True
    )
    return eval(done.stdout.strip().splitlines()[-1])


def test_importing_building_and_training_the_core_does_not_import_skillnet(tmp_path):
    core = (
        "import moesaic as ms, moesaic.train.trainer, moesaic.models.lm, moesaic.cli.train,"
        " moesaic.cli.main, moesaic.data, moesaic.inference, moesaic.metrics, moesaic.convert\n"
        "from moesaic.train.config import apply_overrides\n"
        "from moesaic.train.recipes import get_recipe\n"
        "from moesaic.train.trainer import Trainer\n"
        "steps = ['train.steps=2', 'train.eval_every=2']\n"
        "Trainer(apply_overrides(get_recipe('lm-moe-test'), steps), 'run', progress=False).fit()\n"
    )
    assert _loaded_after(core, cwd=tmp_path) == []


def test_a_skillnet_model_name_imports_skillnet_on_demand():
    loaded = _loaded_after("import moesaic as ms\nms.models.create('skillnet-tiny')")
    assert "moesaic.skillnet.model" in loaded
