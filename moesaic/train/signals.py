"""Signal handlers installed for a block of code, and the previous ones put back after it."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterable, Iterator

__all__ = ["signal_handlers"]


@contextlib.contextmanager
def signal_handlers(signals: Iterable[int], handler: Callable[[int, object], None]) -> Iterator:
    """``handler`` for ``signals`` inside the block; a no-op outside the main thread, where Python
    cannot install handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
