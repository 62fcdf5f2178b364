"""Whole experts on worker threads: the split, the modes the workers inherit, the thread count."""

import dataclasses
import os
import sys
import threading

import pytest
import torch

import moesaic as ms
from moesaic.kernels.cpu import threads as expert_threads
from moesaic.kernels.cpu.capability import cpu_capability
from moesaic.kernels.cpu.threads import expert_order, makespan, run_experts
from moesaic.kernels.cpu.tuning import DEFAULT_TUNING, CpuTuning
from tests.cases import expert_backend


@pytest.mark.parametrize(
    "rows,workers,want",
    [([5, 5, 5, 5], 2, 10), ([9, 5, 4, 3, 3], 2, 12), ([7], 3, 7), ([], 2, 0), ([3, 3, 3], 4, 3)],
)
def test_makespan_is_greedy_list_scheduling(rows, workers, want):
    assert makespan(rows, workers) == want


def test_order_is_every_expert_with_rows_largest_first():
    assert expert_order([30, 0, 50, 40, 30], 2) == [2, 3, 0, 4]


def test_a_skewed_routing_stays_on_one_team():
    assert expert_order([100, 2, 2, 2], 2) is None
    assert expert_order([30, 30, 30, 30], 2) == [0, 1, 2, 3]
    assert expert_order([30, 0, 30], 1) is None


@pytest.mark.parametrize("vendor,loop", [("AMD", True), ("other", True), ("Intel", False)])
def test_mid_sized_experts_take_the_loop_where_it_measured_faster(monkeypatch, vendor, loop):
    cap = dataclasses.replace(cpu_capability(), vendor=vendor)
    monkeypatch.setattr(expert_threads, "cpu_capability", lambda: cap)
    mid = [500, 500, 500, 500]  # 500 rows per expert, inside loop_rows, 2000 <= loop_max_total
    assert (expert_order(mid, 2) is None) == loop
    assert expert_order([60, 60, 60, 60], 2) == [0, 1, 2, 3]  # below the band: workers
    assert expert_order([2000] * 4, 2) == [0, 1, 2, 3]  # above it: workers
    assert expert_order([600] * 16, 2) == list(range(16))  # more than loop_max_total rows
    # small experts (D * F under loop_small) take the band's loop on every CPU
    small, big = DEFAULT_TUNING.loop_small - 1, DEFAULT_TUNING.loop_small
    assert expert_order(mid, 2, DEFAULT_TUNING, small) is None
    assert (expert_order(mid, 2, DEFAULT_TUNING, big) is None) == loop


def test_the_layer_schedules_by_its_experts_size(monkeypatch):
    seen = []
    real = expert_threads.expert_order
    monkeypatch.setattr(expert_threads, "expert_order", lambda *a: seen.append(a[3]) or real(*a))
    layer = ms.MoE(16, 48, 4, router="topk", expert_backend=expert_backend())
    layer(torch.randn(64, 16))
    assert seen and set(seen) == {16 * 48}


def test_every_expert_with_rows_runs_once_on_the_workers():
    seen = []
    run_experts(seen.append, [3, 0, 5, 1, 4, 2], 2)
    assert sorted(seen) == [0, 2, 3, 4, 5]
    names = set()
    run_experts(lambda e: names.add(threading.current_thread().name), [4] * 8, 2)
    assert names <= {threading.current_thread().name, "moesaic-experts_0"}


def test_the_caller_works_single_threaded_and_gets_its_thread_count_back():
    before = torch.get_num_threads()
    seen = {}
    run_experts(
        lambda e: seen.setdefault(threading.current_thread().name, torch.get_num_threads()),
        [4] * 64,
        2,
    )
    assert set(seen.values()) == {1}
    assert torch.get_num_threads() == before


def test_workers_inherit_inference_and_grad_mode():
    seen = []

    def record(e):
        seen.append((torch.is_inference_mode_enabled(), torch.is_grad_enabled()))

    with torch.inference_mode():
        run_experts(record, [1, 1], 2)
    with torch.no_grad():
        run_experts(record, [1, 1], 2)
    assert seen == [(True, False)] * 2 + [(False, False)] * 2


def test_threads_path_keeps_the_callers_thread_count_and_matches_the_loop():
    before = torch.get_num_threads()
    loop = ms.Experts(6, 16, 32, "swiglu", backend=expert_backend("loop"))
    threads = ms.Experts(6, 16, 32, "swiglu", backend=expert_backend("threads"))
    threads.load_state_dict(loop.state_dict())
    counts = [8, 0, 8, 7, 1, 8]
    x = torch.randn(sum(counts), 16)
    torch.testing.assert_close(threads(x, counts), loop(x, counts))
    assert torch.get_num_threads() == before
    names = {t.name for t in threading.enumerate()}
    if before > 1:
        assert any(n.startswith("moesaic-experts") for n in names)


def test_an_error_in_a_worker_reaches_the_caller():
    def fail(e):
        if e == 1:
            raise RuntimeError("expert 1 failed")

    with pytest.raises(RuntimeError, match="expert 1 failed"):
        run_experts(fail, [1, 1], 2)


def test_thread_local_modes_see_every_expert_matmul():
    from torch.utils.flop_counter import FlopCounterMode

    counts = [8, 8, 8, 8]
    flops = {}
    for impl in ("loop", "threads"):
        experts = ms.Experts(4, 16, 32, backend=expert_backend(impl))
        with FlopCounterMode(display=False) as counter:
            experts(torch.randn(32, 16), counts)
        flops[impl] = counter.get_total_flops()
    assert flops["threads"] == flops["loop"] == 2 * 2 * 32 * 16 * 32


def test_a_forked_child_runs_experts_on_its_own_threads():
    import multiprocessing as mp

    experts = ms.Experts(4, 8, 16, backend=expert_backend("threads"))
    counts = [4, 4, 4, 4]
    x = torch.randn(16, 8)
    want = experts(x, counts)  # the parent's worker threads exist now
    ctx = mp.get_context("fork")
    queue = ctx.Queue()

    def child():
        queue.put(experts(x, counts).tolist())

    proc = ctx.Process(target=child)
    proc.start()
    got = queue.get(timeout=60)
    proc.join(timeout=60)
    assert proc.exitcode == 0
    torch.testing.assert_close(torch.tensor(got), want)


def test_the_callers_openmp_team_is_released_only_before_pool_threads(monkeypatch):
    calls = []
    monkeypatch.setattr(expert_threads, "_openmp_pause", lambda: lambda: calls.append(1))
    run_experts(lambda e: None, [4] * 8, 2)  # pool threads
    assert calls == [1]
    run_experts(lambda e: None, [100, 2, 2, 2], 2)  # skewed: one team, nothing released
    run_experts(lambda e: None, [4] * 8, 1)
    run_experts(lambda e: None, [4] * 8, 2, CpuTuning(release_openmp=False))
    assert calls == [1]


@pytest.mark.skipif(sys.platform != "linux", reason="torch's OpenMP runtime is found by soname")
def test_releasing_the_openmp_team_leaves_torch_working():
    expert_threads._openmp_pause.cache_clear()
    pause = expert_threads._openmp_pause()
    assert pause is not None  # Linux torch wheels run ATen on libgomp, which has it
    # found by its mapped path too: aarch64 wheels carry a renamed libgomp-<hash>.so.1.0.0
    assert any(os.path.isabs(p) for p in expert_threads._loaded_openmp())
    x = torch.randn(1 << 18, dtype=torch.float64)
    want = x.sum()
    before = torch.get_num_threads()
    for _ in range(3):
        assert pause() == 0
        torch.testing.assert_close(x.sum(), want)  # the next parallel op rebuilds the team
    assert torch.get_num_threads() == before
    on_threads = ms.Experts(8, 16, 32, backend=expert_backend("threads"))
    on_loop = ms.Experts(8, 16, 32, backend=expert_backend("loop"))
    on_loop.load_state_dict(on_threads.state_dict())
    y = torch.randn(320, 16)
    for _ in range(2):  # each threads call releases the team, each loop call rebuilds it
        torch.testing.assert_close(on_threads(y, [40] * 8), on_loop(y, [40] * 8))
