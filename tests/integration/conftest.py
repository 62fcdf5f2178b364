"""SkillNet fixtures shared by test_skillnet.py and test_skillnet_pretrain.py: the smoke data is
generated once per session (about 20 s), and one short sparse pretraining serves both the test
that pretraining learns and the test that fine-tuning after it beats chance on every task."""

import copy

import pytest
import torch

import moesaic as ms

# A shorter pretraining than the CLI's smoke recipe (300 steps, batch 24) and its 300 fine-tuning
# steps: fewer fine-tuning steps leave some task only a test query or two above its bar, which
# another CPU's rounding can tip (docs/skillnet.md, "The test's margins").
PRETRAIN = {"steps": 30, "batch_size": 8, "warmup": 5}
FINETUNE = {"steps": 300, "batch_size": 24, "warmup": 10, "lr": 5e-3}


def _one_thread():
    # one intra-op thread: these widths gain nothing from two, and a busy machine's idle
    # OpenMP spinning made the tests several times slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    return threads


@pytest.fixture
def one_thread():
    threads = _one_thread()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def skillnet_data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("skillnet-data")


@pytest.fixture(scope="session")
def skillnet_smoke(skillnet_data_dir):
    """The smoke preset's task data and pretraining data."""
    from moesaic import skillnet as sk

    data = sk.load_task_data(preset="smoke", data_dir=skillnet_data_dir)
    return data, sk.load_pretrain_data(data, "smoke", data_dir=skillnet_data_dir)


@pytest.fixture(scope="session")
def skillnet_pretrained(skillnet_smoke):
    """(state_dict of ``skillnet-tiny`` after sparse pretraining, the pretraining history,
    the state_dict's shapes before pretraining)."""
    from moesaic import skillnet as sk

    threads = _one_thread()
    try:
        torch.manual_seed(0)
        model = ms.models.create("skillnet-tiny")
        before = {k: v.shape for k, v in model.state_dict().items()}
        history = sk.pretrain_skillnet(model, skillnet_smoke[1], sk.SkillNetRecipe(**PRETRAIN))
    finally:
        torch.set_num_threads(threads)
    return copy.deepcopy(model.state_dict()), history, before


@pytest.fixture
def cli(capsys):
    """``moesaic ARGS`` in this process: (exit status, stdout, stderr); argparse's own errors
    give their exit status, and the torch thread count the command set is restored."""
    from moesaic.cli.main import main

    def run(*args):
        capsys.readouterr()
        threads = torch.get_num_threads()
        try:
            code = main(list(args))
        except SystemExit as exit_:
            code = exit_.code
        finally:
            torch.set_num_threads(threads)
        out = capsys.readouterr()
        return code, out.out, out.err

    return run
