import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    # one intra-op thread: these tiny models gain nothing from two, and on a busy machine idle
    # OpenMP threads spinning against other processes made every small op milliseconds long
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
