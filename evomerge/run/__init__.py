"""The run of a study: the loop (``StudyRun``), its worker pools, the lease, report scoring, progress.

``loop``: ask/tell against the store over an abstract ``WorkerPool``; ``pool``: ``RayPool`` and
``InProcessPool``; ``lease``: one run per study; ``signals``: Ctrl-C as a flag; ``report``: held-out
scoring of the final front; ``progress``: the terminal line, read from a ``StudyView``; ``problem``:
what an algorithm is told of the objectives and the genome.
"""

from evomerge.run.lease import Lease
from evomerge.run.loop import Job, RunError, RunStats, StudyRun
from evomerge.run.pool import InProcessPool, Outcome, PoolError, RayPool, Task, WorkerPool, worker_config
from evomerge.run.problem import algorithm_settings, build_algorithm

__all__ = [
    "InProcessPool",
    "Job",
    "Lease",
    "Outcome",
    "PoolError",
    "RayPool",
    "RunError",
    "RunStats",
    "StudyRun",
    "Task",
    "WorkerPool",
    "algorithm_settings",
    "build_algorithm",
    "worker_config",
]
