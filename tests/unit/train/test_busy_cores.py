"""The busy-machine warning: given when other processes hold the cores a multi-threaded run
needs, never for one thread or an idle machine."""

from __future__ import annotations

import os

import pytest

from moesaic.train import resources
from moesaic.train.resources import busy_cores_warning


@pytest.fixture
def machine(monkeypatch):
    def set_state(cores: int, load: float, idle: float | None = None):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
        monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
        # what /proc/stat shows while the run waits: by default the load, all of it others'
        free = max(0.0, cores - load) if idle is None else idle
        monkeypatch.setattr(resources, "_idle_cores", lambda window_s: free)

    return set_state


@pytest.mark.parametrize(
    "cores,load,threads,warned",
    [
        (2, 0.2, 2, False),  # idle machine
        (2, 1.0, 2, True),  # one other busy process on 2 cores
        (2, 5.0, 1, False),  # one thread never waits for another
        (8, 3.0, 4, False),  # enough idle cores left
        (8, 6.0, 4, True),
    ],
)
def test_warns_exactly_when_the_threads_outnumber_the_idle_cores(
    machine, cores, load, threads, warned
):
    machine(cores, load)
    text = busy_cores_warning(threads)
    assert (text is not None) == warned
    if warned:
        assert f"idle on {cores} cores" in text
        assert "--set train.threads=1" in text and "\n" not in text


def test_no_warning_where_the_load_is_unknown(monkeypatch):
    monkeypatch.delattr(resources.os, "getloadavg")
    assert busy_cores_warning(2) is None


def test_a_high_load_of_this_process_alone_is_no_warning(machine):
    machine(2, 1.8, idle=1.9)  # the load average remembers our own work; the cores are idle now
    assert busy_cores_warning(2) is None


def test_idle_cores_are_read_from_proc_stat():
    idle = resources._idle_cores(0.05)
    if os.path.exists("/proc/stat"):
        assert idle is not None and 0 <= idle <= os.cpu_count() + 1e-9
