"""Ctrl-C as a flag the study loop checks between candidates."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def ctrl_c() -> Iterator[threading.Event]:
    """Ctrl-C sets the yielded event; a second Ctrl-C interrupts at once.

    A KeyboardInterrupt raised while the main thread is inside ``ray.wait`` can be lost in Ray's own
    signal checks (seen: a search ran to its budget after SIGINT), so the handler only records it and
    the loop raises it itself, at a point where the store and the algorithm's checkpoint agree.
    """
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop  # signal handlers live in the main thread; elsewhere Ctrl-C is the caller's
        return

    def on_sigint(signum: int, frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)
