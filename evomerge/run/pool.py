"""Workers that evaluate candidates, behind one interface the study loop and the report scoring use.

``WorkerPool`` is the contract: ``submit(task)`` hands a task to an idle worker and returns a handle;
``wait(timeout)`` returns the tasks that finished, each as an ``Outcome`` carrying either the worker's
result or why the worker died; ``idle`` is how many workers could take a task now; ``close`` ends them.

Deciding whether a candidate whose worker died is tried again is the loop's (it counts attempts in the
store, so the bound holds across restarts); the pool replaces the dead worker, and raises ``PoolError``
after ``max_deaths`` deaths in a row with no result in between (workers that cannot even start, a
cluster with no node left), instead of replacing workers forever.

Implementations: ``RayPool`` (one Ray actor per worker, one GPU each when the cluster has GPUs) and
``InProcessPool`` (workers run in this process, one task at a time: tests, benchmarks, debugging).

On a cluster: the loop reads ``idle`` on every turn and asks the algorithm for that many proposals
(less what is queued), so a pool may grow or shrink between turns (nodes joining, leaving); a worker
on a node that dies comes back as a ``died`` outcome and is replaced wherever Ray finds resources.
"""

from __future__ import annotations

import itertools
import os
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from evomerge.space import portable_space
from evomerge.workers import MergeWorker, WorkerConfig

if TYPE_CHECKING:
    from evomerge.space import SearchSpace

DEATHS_PER_WORKER = 10  # a pool gives up after this many deaths per worker in a row, with no result between


class PoolError(RuntimeError):
    """No worker is left to evaluate anything; the message is for the user."""


@dataclass
class Task:
    """One evaluation: a candidate's recipe scored on some objectives (``front`` and ``fidelity`` for a
    multi-fidelity evaluation, see ``MergeWorker.evaluate``)."""

    number: int
    recipe_json: str
    objectives: list[str]
    front: list[list[float]] | None = None
    fidelity: dict | None = None

    def args(self) -> tuple:
        extra = () if self.front is None and self.fidelity is None else (self.front, self.fidelity)
        return (self.number, self.recipe_json, self.objectives, *extra)


@dataclass
class Outcome:
    """A finished task: ``result`` is ``MergeWorker.evaluate``'s dict, or None when the worker died
    (``died`` then says why)."""

    handle: int
    task: Task
    worker: str
    result: dict | None = None
    died: str | None = None


class Evaluates(Protocol):
    def evaluate(self, number: int, recipe_json: str, objective_names: list[str] | None = None,
                 front: list[list[float]] | None = None, fidelity: dict | None = None) -> dict: ...


class WorkerPool(ABC):
    @abstractmethod
    def submit(self, task: Task) -> int:
        """Start ``task`` on an idle worker (``idle`` must be > 0); returns its handle."""

    @abstractmethod
    def wait(self, timeout: float | None = None) -> list[Outcome]:
        """Finished tasks (at least one unless ``timeout`` passed or nothing is in flight)."""

    @abstractmethod
    def worker_of(self, handle: int) -> str:
        """The name of the worker running a task in flight (what the store records)."""

    @property
    @abstractmethod
    def idle(self) -> int:
        """Workers that could take a task now."""

    @property
    @abstractmethod
    def in_flight(self) -> int:
        """Tasks submitted and not yet returned by ``wait``."""

    @abstractmethod
    def close(self) -> None:
        """End the workers (the pool is unusable afterwards)."""

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Slots:
    """Bookkeeping shared by the pools: which worker slots are idle, and deaths in a row."""

    def __init__(self, n: int, max_deaths: int | None) -> None:
        if n < 1:
            raise ValueError(f"a pool needs at least one worker, got {n}")
        self.idle: list[int] = list(range(n))
        self.max_deaths = max_deaths if max_deaths is not None else DEATHS_PER_WORKER * n
        self.deaths = 0  # worker deaths since the pool's last result

    def finished(self, slot: int) -> None:
        self.deaths = 0
        self.idle.append(slot)

    def died(self, slot: int, why: str) -> None:
        """Count a death (the caller has replaced the worker); too many in a row end the pool."""
        self.deaths += 1
        if self.deaths >= self.max_deaths:
            raise PoolError(f"{self.deaths} worker deaths in a row with no result in between; last: {why}")
        self.idle.append(slot)


def worker_config(space: SearchSpace) -> WorkerConfig:
    """What a worker needs to evaluate candidates of ``space``."""
    space = portable_space(space)  # workers may run in another directory, or on another node
    return WorkerConfig(
        kind=space.genome.type,
        embed_source=getattr(space.genome, "embed_source", 0),
        base=space.model_ref(space.base_model) if space.base_model else None,
        sources=[space.model_ref(m) for m in space.models],
        objectives=[o.model_dump() for o in space.all_objectives()],
        task_paths=space.task_dirs,
        batch_size=space.evaluation.batch_size,
        dtype=space.evaluation.dtype,
        fused=space.evaluation.fused_kernels,
    )


class InProcessPool(WorkerPool):
    """Workers in this process; ``wait`` runs one submitted task to its end. A worker whose ``evaluate``
    raises (``MergeWorker`` itself turns every failure into an error result) counts as dead."""

    def __init__(self, factory: Callable[[], Evaluates], workers: int = 1, max_deaths: int | None = None) -> None:
        self.factory = factory
        self.slots = _Slots(workers, max_deaths)
        self.workers: list[Evaluates | None] = [factory() for _ in range(workers)]
        self.pending: deque[tuple[int, int, Task]] = deque()  # (handle, slot, task)
        self._handles = itertools.count(1)

    @classmethod
    def from_config(cls, cfg: WorkerConfig, workers: int = 1) -> InProcessPool:
        return cls(lambda: MergeWorker(cfg), workers)

    def submit(self, task: Task) -> int:
        slot = self.slots.idle.pop()
        handle = next(self._handles)
        self.pending.append((handle, slot, task))
        return handle

    def wait(self, timeout: float | None = None) -> list[Outcome]:
        if not self.pending:
            return []
        handle, slot, task = self.pending.popleft()
        name = f"inprocess-{slot}"
        worker = self.workers[slot]
        try:
            assert worker is not None
            return [self._done(slot, Outcome(handle, task, name, result=worker.evaluate(*task.args())))]
        except Exception as e:  # noqa: BLE001 - the worker broke, not the candidate: report, replace
            why = f"{type(e).__name__}: {e}"
            self.workers[slot] = self.factory()
            self.slots.died(slot, why)
            return [Outcome(handle, task, name, died=why)]

    def worker_of(self, handle: int) -> str:
        return next(f"inprocess-{slot}" for h, slot, _ in self.pending if h == handle)

    def _done(self, slot: int, outcome: Outcome) -> Outcome:
        self.slots.finished(slot)
        return outcome

    @property
    def idle(self) -> int:
        return len(self.slots.idle)

    @property
    def in_flight(self) -> int:
        return len(self.pending)

    def close(self) -> None:
        self.workers = [None] * len(self.workers)
        self.slots.idle.clear()


def ray_env() -> dict[str, str]:
    """Environment of the Ray workers: offline hubs, and the paths and threads this process was given."""
    env = {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "RAY_AUTH_MODE": "disabled",
    }
    for k in ("EVOMERGE_ZOO_DIR", "HF_HOME", "EVOMERGE_THREADS"):
        if k in os.environ:
            env[k] = os.environ[k]
    return env


class RayPool(WorkerPool):
    """One ``MergeWorker`` Ray actor per worker (one GPU each when the cluster has GPUs, else one CPU).

    Starts a local Ray (``address=None``) or joins a cluster unless Ray is already initialised. An actor
    that dies (OOM, lost node) is replaced by a new one, which Ray places wherever resources are free.
    """

    def __init__(self, cfg: WorkerConfig, workers: int = 1, address: str | None = None,
                 max_deaths: int | None = None) -> None:
        import ray  # kept off the path of the commands that do not search (status, front, --help)

        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        if not ray.is_initialized():
            kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False, configure_logging=False,
                                          runtime_env={"env_vars": ray_env()})
            if address:
                ray.init(address=address, **kwargs)
            else:
                ray.init(num_cpus=max(1, workers), **kwargs)
        self.ray = ray
        self.died_errors = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                            ray.exceptions.NodeDiedError)
        self.cfg = cfg
        gpus = ray.cluster_resources().get("GPU", 0)
        self.actor_opts: dict[str, Any] = {"num_gpus": 1, "num_cpus": 1} if gpus >= 1 else {"num_cpus": 1}
        self.remote_cls = ray.remote(MergeWorker)
        self.slots = _Slots(workers, max_deaths)
        self.actors: list[Any] = [self._new_actor() for _ in range(workers)]
        self.refs: dict[Any, tuple[int, int, Task]] = {}  # ObjectRef -> (handle, slot, task)
        self._handles = itertools.count(1)

    def _new_actor(self) -> Any:
        return self.remote_cls.options(max_restarts=0, **self.actor_opts).remote(self.cfg)

    def submit(self, task: Task) -> int:
        slot = self.slots.idle.pop()
        handle = next(self._handles)
        self.refs[self.actors[slot].evaluate.remote(*task.args())] = (handle, slot, task)
        return handle

    def wait(self, timeout: float | None = None) -> list[Outcome]:
        if not self.refs:
            return []
        ready, _ = self.ray.wait(list(self.refs), num_returns=1, timeout=timeout)
        out = []
        for ref in ready:
            handle, slot, task = self.refs.pop(ref)
            name = f"actor-{slot}"
            try:
                res = self.ray.get(ref)
            except self.died_errors as e:
                why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                self.ray.kill(self.actors[slot])  # no-op for a dead actor; frees a half-dead one
                self.actors[slot] = self._new_actor()
                self.slots.died(slot, why)
                out.append(Outcome(handle, task, name, died=why))
                continue
            self.slots.finished(slot)
            out.append(Outcome(handle, task, name, result=res))
        return out

    def worker_of(self, handle: int) -> str:
        return next(f"actor-{slot}" for h, slot, _ in self.refs.values() if h == handle)

    @property
    def idle(self) -> int:
        return len(self.slots.idle)

    @property
    def in_flight(self) -> int:
        return len(self.refs)

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)
        self.slots.idle.clear()
        self.refs.clear()
