"""The run of a study: the loop (``StudyRun``), its worker pools, the lease, report scoring, progress.

``loop``: ask/tell against the store over an abstract ``WorkerPool``; ``pool``: ``RayPool`` and
``InProcessPool``; ``lease``: one run per study; ``signals``: Ctrl-C as a flag; ``report``: held-out
scoring of the final front; ``progress``: the run's events and progress, read from a ``StudyView``;
``problem``: what an algorithm is told of the objectives and the genome.

The names below load their module on first use, so ``evomerge validate`` can read ``problem`` without
the store, the pools and the workers coming along.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "Lease": "lease",
    "Job": "loop",
    "RunError": "loop",
    "RunStats": "loop",
    "StudyRun": "loop",
    "InProcessPool": "pool",
    "Note": "pool",
    "Outcome": "pool",
    "PoolError": "pool",
    "RayPool": "pool",
    "Task": "pool",
    "WorkerPool": "pool",
    "worker_config": "pool",
    "algorithm_settings": "problem",
    "build_algorithm": "problem",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)


__all__ = sorted(_WHERE)
