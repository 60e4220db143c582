"""Where evomerge keeps what it builds once per machine (PS sources of data-flow searches, the C
kernels): ``$EVOMERGE_CACHE_DIR``, else ``~/.cache/evomerge``. The demo zoo has its own variable,
``$EVOMERGE_ZOO_DIR`` (see :mod:`evomerge.zoo`)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$EVOMERGE_CACHE_DIR``, else ``~/.cache/evomerge``."""
    env = os.environ.get("EVOMERGE_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "evomerge"
