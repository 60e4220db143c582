"""Where evomerge keeps what it builds once per machine (PS sources of data-flow searches, the C
kernels): ``$EVOMERGE_CACHE_DIR``, else ``~/.cache/evomerge``. The demo zoo has its own variable,
``$EVOMERGE_ZOO_DIR`` (see :mod:`evomerge.zoo`)."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Iterator
from pathlib import Path


def cache_root() -> Path:
    """``$EVOMERGE_CACHE_DIR``, else ``~/.cache/evomerge``."""
    env = os.environ.get("EVOMERGE_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "evomerge"


@contextlib.contextmanager
def file_lock(path: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """An exclusive lock on ``path`` (created), so that one process builds what the others then reuse.

    ``on_wait`` is called once, before blocking, when another process holds the lock (so a user waiting
    minutes on another build is told why)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
