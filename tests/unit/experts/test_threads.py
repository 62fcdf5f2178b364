"""Whole experts on worker threads: the split, the modes the workers inherit, the thread count."""

import threading

import pytest
import torch

import moesaic as ms
from moesaic.experts.threads import expert_groups, run_groups, split_by_rows


@pytest.mark.parametrize(
    "counts,groups",
    [([5, 5, 5, 5], 2), ([10, 0, 1, 1, 8], 2), ([0, 0, 3], 4), ([], 2), ([1] * 7, 3), ([4], 2)],
)
def test_split_covers_every_expert_with_rows_once_in_order(counts, groups):
    split = split_by_rows(counts, groups)
    assert [e for g in split for e in g] == [e for e, n in enumerate(counts) if n]
    assert len(split) <= groups and all(split)


def test_split_balances_rows_to_within_one_expert():
    counts = [64] * 32
    split = split_by_rows(counts, 2)
    rows = [sum(counts[e] for e in g) for g in split]
    assert abs(rows[0] - rows[1]) <= 64


def test_a_skewed_routing_stays_on_one_team():
    assert expert_groups([100, 2, 2, 2], 2) == [[0, 1, 2, 3]]
    assert expert_groups([30, 30, 30, 30], 2) == [[0, 1], [2, 3]]
    assert expert_groups([30, 0, 30], 1) == [[0, 2]]


def test_large_experts_stay_on_one_team():
    assert expert_groups([1000, 1000, 1000, 1000], 2) == [[0, 1, 2, 3]]


def test_workers_inherit_inference_and_grad_mode():
    seen = []

    def record(e):
        seen.append((torch.is_inference_mode_enabled(), torch.is_grad_enabled()))

    with torch.inference_mode():
        run_groups(record, [[0], [1]])
    with torch.no_grad():
        run_groups(record, [[0], [1]])
    assert seen == [(True, False)] * 2 + [(False, False)] * 2


def test_threads_path_keeps_the_callers_thread_count_and_matches_the_loop():
    before = torch.get_num_threads()
    loop = ms.Experts(6, 16, 32, "swiglu", impl="loop")
    threads = ms.Experts(6, 16, 32, "swiglu", impl="threads")
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
        run_groups(fail, [[0], [1]])


def test_thread_local_modes_see_every_expert_matmul():
    from torch.utils.flop_counter import FlopCounterMode

    counts = [8, 8, 8, 8]
    flops = {}
    for impl in ("loop", "threads"):
        experts = ms.Experts(4, 16, 32, impl=impl)
        with FlopCounterMode(display=False) as counter:
            experts(torch.randn(32, 16), counts)
        flops[impl] = counter.get_total_flops()
    assert flops["threads"] == flops["loop"] == 2 * 2 * 32 * 16 * 32


def test_a_forked_child_runs_experts_on_its_own_threads():
    import multiprocessing as mp

    experts = ms.Experts(4, 8, 16, impl="threads")
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
