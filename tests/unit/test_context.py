import threading

import torch

import moesaic as ms


def test_contexts_nest_and_restore():
    assert ms.current_context().task is None
    ids = torch.arange(4)
    with ms.routing_context(task=1):
        with ms.routing_context(token_ids=ids):
            ctx = ms.current_context()
            assert ctx.task == 1 and ctx.token_ids is ids
        assert ms.current_context().token_ids is None
        assert ms.current_context().task == 1
    assert ms.current_context().task is None


def test_context_is_restored_after_an_exception():
    try:
        with ms.routing_context(task=2):
            raise RuntimeError
    except RuntimeError:
        pass
    assert ms.current_context().task is None


def test_context_does_not_leak_across_threads():
    seen = []
    with ms.routing_context(task=3):
        t = threading.Thread(target=lambda: seen.append(ms.current_context().task))
        t.start()
        t.join()
    assert seen == [None]
