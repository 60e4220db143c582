"""Workers that evaluate candidates, behind one interface the study loop and the report scoring use.

``WorkerPool`` is the contract: ``submit(task)`` hands a task to an idle worker and returns a handle;
``wait(timeout)`` returns the tasks that finished, each as an ``Outcome`` carrying either the worker's
result or why the worker died; ``idle`` is how many workers could take a task now; ``close`` ends them.

Deciding whether a candidate whose worker died is tried again is the loop's (it counts attempts in the
store, so the bound holds across restarts); the pool replaces the dead worker, and raises ``PoolError``
after ``max_deaths`` deaths in a row with no result in between (a cluster with no node left), instead
of replacing workers forever. A worker that cannot start at all (a missing model, a bad task, out of
memory) raises ``WorkerStartError`` with its own error at once: no task is handed to a worker before it
has started, so no candidate is charged for it, and the search stops while the cause gets fixed.

Implementations: ``RayPool`` (one Ray actor per worker, one GPU each when the cluster has GPUs) and
``InProcessPool`` (workers run in this process, one task at a time: tests, benchmarks, debugging).

On a cluster: the loop reads ``idle`` on every turn and asks the algorithm for that many proposals
(less what is queued), so a pool may grow or shrink between turns (nodes joining, leaving); a worker
on a node that dies comes back as a ``died`` outcome and is replaced wherever Ray finds resources.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import sys
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from evomerge.space import portable_space
from evomerge.workers import MergeWorker, WorkerConfig

if TYPE_CHECKING:
    from evomerge.space import SearchSpace

# How a pool reports what it is waiting for: ``say(kind, message, **figures)`` (``EventLog.event``).
Say = Callable[..., None]

NODE_CHECK_S = 5.0  # while workers are missing, how often the pool looks for lost nodes to name
# How long after a death the pool keeps looking: Ray marks a node dead only once it has missed its
# heartbeats (about 30 s), often after the dead workers were replaced elsewhere.
NODE_WATCH_S = 90.0
DEATHS_PER_WORKER = 10  # a pool gives up after this many deaths per worker in a row, with no result between


class PoolError(RuntimeError):
    """No worker is left to evaluate anything; the message is for the user."""


class WorkerStartError(PoolError):
    """A worker could not start; the message is its own error, in one line."""


def first_line(e: BaseException) -> str:
    """``Type: first line of the message``: what a user needs of an exception, without its traceback."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def short_reason(e: BaseException) -> str:
    """Why a Ray actor died, in a few words; Ray's own text runs to a dozen lines, and its list of
    common causes (OOM killer, SIGSEGV) is printed whatever the cause was, so only its exit detail counts."""
    text = str(e)
    if type(e).__name__ == "ActorUnavailableError":  # the actor's process cannot be reached: its node is gone
        return "node lost or unreachable"
    m = re.search(r"Worker exit detail: ([^.]*)", text)
    detail = m.group(1).strip() if m else ""
    if "memory" in detail.lower():
        return "out of memory"
    if type(e).__name__ == "NodeDiedError" or "node" in detail.lower():
        return "node lost"
    if "connection error" in detail or "unexpectedly" in detail:
        return "process killed or crashed"
    if detail:
        return detail[:120]
    if "died unexpectedly" in text:  # Ray lost the actor before it learnt why: its process or its node went
        return "process or its node gone"
    lines = text.strip().splitlines()
    return lines[0][:120] if lines else type(e).__name__


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


class Note(NamedTuple):
    """One-line news about the pool: ``kind`` (``node_lost``, ``workers_back``) is what the run stores it
    as, ``message`` the line the user reads."""

    kind: str
    message: str


def slot_label(worker: str) -> str:
    """``worker 2`` for the pool's worker ``actor-2`` or ``inprocess-2``: how messages name a worker."""
    return "worker " + worker.rsplit("-", 1)[-1]


class Evaluates(Protocol):
    def evaluate(self, number: int, recipe_json: str, objective_names: list[str] | None = None,
                 front: list[list[float]] | None = None, fidelity: dict | None = None) -> dict: ...


class WorkerPool(ABC):
    @abstractmethod
    def submit(self, task: Task) -> int:
        """Start ``task`` on an idle worker (``idle`` must be > 0); returns its handle."""

    @abstractmethod
    def wait(self, timeout: float | None = None) -> list[Outcome]:
        """Finished tasks (at least one unless ``timeout`` passed, nothing is in flight, or a worker
        finished starting meanwhile)."""

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

    @property
    def starting(self) -> int:
        """Workers still starting: they become idle in a later ``wait`` (which raises ``WorkerStartError``
        for one that cannot start)."""
        return 0

    def notes(self) -> list[Note]:
        """News about the pool since the last call (a node lost, workers back), for the user and the store."""
        return []

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

    def died(self, why: str) -> None:
        """Count a death (the caller replaces the worker); too many in a row end the pool."""
        self.deaths += 1
        if self.deaths >= self.max_deaths:
            raise PoolError(f"{self.deaths} worker deaths in a row with no result in between; last: {why}")


def worker_config(space: SearchSpace) -> WorkerConfig:
    """What a worker needs to evaluate candidates of ``space``."""
    space = portable_space(space)  # workers may run in another directory, or on another node
    return WorkerConfig(
        kind=space.genome.type,
        genome=space.genome.model_dump(mode="json"),
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
        self.workers: list[Evaluates | None] = [self._start() for _ in range(workers)]
        self.pending: deque[tuple[int, int, Task]] = deque()  # (handle, slot, task)
        self._handles = itertools.count(1)
        self._failed: WorkerStartError | None = None  # a replacement that could not start, raised next call

    @classmethod
    def from_config(cls, cfg: WorkerConfig, workers: int = 1) -> InProcessPool:
        return cls(lambda: MergeWorker(cfg), workers)

    def _start(self) -> Evaluates:
        try:
            return self.factory()
        except Exception as e:  # noqa: BLE001 - any start-up failure is the user's to fix: say which
            raise WorkerStartError(f"a worker could not start: {first_line(e)}") from e

    def submit(self, task: Task) -> int:
        if self._failed is not None:
            raise self._failed
        slot = self.slots.idle.pop()
        handle = next(self._handles)
        self.pending.append((handle, slot, task))
        return handle

    def wait(self, timeout: float | None = None) -> list[Outcome]:
        if self._failed is not None:
            raise self._failed
        if not self.pending:
            return []
        handle, slot, task = self.pending.popleft()
        name = f"inprocess-{slot}"
        worker = self.workers[slot]
        try:
            assert worker is not None
            return [self._done(slot, Outcome(handle, task, name, result=worker.evaluate(*task.args())))]
        except Exception as e:  # noqa: BLE001 - the worker broke, not the candidate: report, replace
            why = first_line(e)
            self.slots.died(why)
            try:
                self.workers[slot] = self._start()
                self.slots.idle.append(slot)
            except WorkerStartError as err:
                # The death is reported first, so the loop charges the candidate that was on the worker;
                # the replacement's failure stops the pool at the next call.
                self.workers[slot] = None
                self._failed = err
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
    }
    for k in ("EVOMERGE_ZOO_DIR", "HF_HOME", "EVOMERGE_THREADS"):
        if k in os.environ:
            env[k] = os.environ[k]
    return env


LOOPBACK = "127.0.0.1"
_CLUSTERS_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


# Ray's own reports of what the pool reports in one line: a worker's death, a node's loss.
RAY_DEATH_REPORTS = ("A worker died or was killed while executing",
                     "has been marked dead because the detector has missed too many heartbeats")


def quiet_worker_death_reports() -> None:
    """Drop Ray's own reports of a worker's death and a node's loss from this driver's output: the pool
    reports each in one line (which worker, why, which candidate, the attempt; which node, how many are
    left); Ray's are a dozen lines of IDs and guesses after it."""
    # Ray's error-listener thread looks the printer up in its module at each message, so wrapping that
    # module attribute filters it (ray is pinned; tests/test_faults.py checks the hook is still there).
    try:
        from ray._private import worker as ray_worker  # private API: see above; only where Ray runs
    except ImportError:  # another Ray's layout (or a stand-in): its report stays, nothing breaks
        return
    printer = getattr(ray_worker, "print_to_stdstream", None)
    if printer is None or getattr(printer, "evomerge_quiet", False):
        return

    def print_unless_a_death_report(data: dict, ignore_prefix: bool) -> None:
        if data.get("pid") == "raylet" and any(r in line for r in RAY_DEATH_REPORTS for line in data.get("lines", [])):
            return
        printer(data, ignore_prefix)

    print_unless_a_death_report.evomerge_quiet = True  # type: ignore[attr-defined]
    ray_worker.print_to_stdstream = print_unless_a_death_report


def start_local_ray(ray: Any, num_cpus: int, **kwargs: Any) -> None:
    """Start a Ray cluster of this process's own that only this machine can reach.

    ``address="local"`` always starts a new cluster: neither ``RAY_ADDRESS`` nor the ``ray_current_cluster``
    file in Ray's temp folder (another user's cluster, a stale one) is read. Ray binds its servers to the
    node's address, and resolves a loopback node address to the machine's routable one unless it runs
    without clusters (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read when ray is imported): both are set
    for the start only. Authentication stays as Ray sets up a new cluster: token authentication, its token
    in ``~/.ray/auth_token`` (created once, made private to the user here).
    """
    # Ray's switch for the node address; a module attribute read at each start, so setting it here
    # works even when ray was imported before (only this process's start is affected)
    from ray._private import ray_constants

    token = Path.home() / ".ray" / "auth_token"
    had_token = token.exists()
    quiet = logging.getLogger("ray._private.authentication.authentication_token_setup")
    saved = (ray_constants.ENABLE_RAY_CLUSTER, os.environ.get(_CLUSTERS_ENV), quiet.level)
    ray_constants.ENABLE_RAY_CLUSTER = False
    os.environ[_CLUSTERS_ENV] = "0"  # Ray's own processes, started below, pick the same address
    quiet.setLevel(logging.ERROR)  # "token authentication is enabled": the default, not news to the user
    try:
        ctx = ray.init(address="local", num_cpus=num_cpus, _node_ip_address=LOOPBACK, **kwargs)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved[0]
        if saved[1] is None:
            os.environ.pop(_CLUSTERS_ENV, None)
        else:
            os.environ[_CLUSTERS_ENV] = saved[1]
        quiet.setLevel(saved[2])
    if not had_token and token.exists():
        token.chmod(0o600)  # Ray writes it readable by everyone; it is the key to this user's clusters
    ip = ctx.address_info.get("node_ip_address")
    if ip != LOOPBACK:
        ray.shutdown()
        raise PoolError(f"the local Ray cluster would listen on {ip}, not only on {LOOPBACK}; not started")


class MergeWorkerActor:
    """The Ray actor: a ``MergeWorker``, or why it could not start (``ready`` returns it), so that a start-up
    failure reaches the driver as the worker's own exception in one line, not as Ray's text about a
    creation task."""

    def __init__(self, cfg: WorkerConfig) -> None:
        self.worker: MergeWorker | None = None
        self.start_error: str | None = None
        try:
            self.worker = MergeWorker(cfg)
        except Exception as e:  # noqa: BLE001 - reported by ready(); the pool stops the search with it
            self.start_error = first_line(e)

    def ready(self) -> str | None:
        """None once started; otherwise the start-up error."""
        return self.start_error

    def info(self) -> dict:
        assert self.worker is not None, self.start_error
        return self.worker.info()

    def evaluate(self, *args: Any) -> dict:
        assert self.worker is not None, self.start_error  # the pool hands tasks to started workers only
        return self.worker.evaluate(*args)


class RayPool(WorkerPool):
    """One ``MergeWorker`` Ray actor per worker (one GPU each when the cluster has GPUs, else one CPU).

    Starts a local Ray of its own (``address=None``, see ``start_local_ray``) or joins the cluster at
    ``address`` with the cluster's own authentication, unless Ray is already initialised. Every worker
    (the first ones and each replacement) is idle only once it has started; one that cannot start raises
    ``WorkerStartError`` from ``wait``. An actor that dies (OOM, lost node) is replaced by a new one,
    which Ray places wherever resources are free.
    """

    def __init__(self, cfg: WorkerConfig, workers: int = 1, address: str | None = None,
                 max_deaths: int | None = None, say: Say | None = None, actor: type = MergeWorkerActor) -> None:
        self.say: Say = say or (lambda kind, message, **fields: None)
        t0 = time.monotonic()
        loaded = sys.modules.get("ray")
        joined = loaded is not None and loaded.is_initialized()  # a test's cluster, or a notebook's
        if not joined and address:
            self.say("ray", f"joining the Ray cluster at {address}", address=address)
        elif not joined:
            self.say("ray", f"starting a local Ray cluster ({max(1, workers)} CPUs, {LOOPBACK} only)")
        import ray  # kept off the path of the commands that do not search (status, front, --help)

        ctx = None
        if not ray.is_initialized():
            kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False, configure_logging=False,
                                          runtime_env={"env_vars": ray_env()})
            if address:
                ctx = ray.init(address=address, **kwargs)
            else:
                start_local_ray(ray, max(1, workers), **kwargs)
        quiet_worker_death_reports()
        self.ray = ray
        res = ray.cluster_resources()
        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
        cpus, gpus = int(res.get("CPU", 0)), int(res.get("GPU", 0))
        if joined:
            self.say("ray", f"using the Ray cluster this process had joined: {nodes} node(s), {cpus} CPUs, "
                     f"{gpus} GPUs", nodes=nodes, cpus=cpus, gpus=gpus)
        elif address:
            where = (ctx.address_info.get("gcs_address") if ctx is not None else None) or address
            self.say("ray", f"joined the Ray cluster at {where}: {nodes} node(s), {cpus} CPUs, {gpus} GPUs "
                     f"({time.monotonic() - t0:.1f}s)", address=where, nodes=nodes, cpus=cpus, gpus=gpus)
        else:
            self.say("ray", f"local Ray cluster up in {time.monotonic() - t0:.1f}s", nodes=nodes, cpus=cpus)
        self.died_errors = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                            ray.exceptions.NodeDiedError)
        self.cfg = cfg
        gpus = ray.cluster_resources().get("GPU", 0)
        self.actor_opts: dict[str, Any] = {"num_gpus": 1, "num_cpus": 1} if gpus >= 1 else {"num_cpus": 1}
        self.remote_cls = ray.remote(actor)  # another class: tests on a cluster without models
        self.slots = _Slots(workers, max_deaths)
        self.slots.idle.clear()  # a worker is idle once it has started
        self.actors: list[Any] = [None] * workers
        self.starting_refs: dict[Any, int] = {}  # ObjectRef of ready() -> slot
        self.refs: dict[Any, tuple[int, int, Task]] = {}  # ObjectRef -> (handle, slot, task)
        self._handles = itertools.count(1)
        self.started_at: dict[int, float] = {}
        models = len(cfg.sources) + (cfg.base is not None)
        self.say("worker", f"starting {workers} worker(s) on {'GPUs' if gpus >= 1 else 'CPUs'}; each loads "
                 f"{models} model(s) before its first candidate", workers=workers, models=models)
        self._notes: list[Note] = []
        self._lost_nodes: set[str] = self._dead_nodes()  # nodes dead before this run are not news
        self._short = False  # whether some workers wait for capacity after a death
        self._checked = time.monotonic()
        self._watch_until = 0.0  # after a death: until when to look for the node Ray will name lost
        for slot in range(workers):
            self._start(slot)

    def _start(self, slot: int) -> None:
        actor = self.remote_cls.options(max_restarts=0, **self.actor_opts).remote(self.cfg)
        self.actors[slot] = actor
        self.starting_refs[actor.ready.remote()] = slot
        self.started_at[slot] = time.monotonic()

    def _started(self, slot: int, ref: Any) -> None:
        try:
            error = self.ray.get(ref)
        except self.died_errors as e:
            # Killed from outside while loading (a lost node, the OOM killer): not the worker's own error,
            # so a death like any other (counted, bounded), and a new worker goes wherever Ray finds room.
            why = short_reason(e)
            self.ray.kill(self.actors[slot])
            self.slots.died(f"while starting: {why}")
            self._lost()
            self._start(slot)
            return
        if error is not None:
            raise WorkerStartError(f"worker {slot} could not start: {error}")
        self.slots.idle.append(slot)
        took = time.monotonic() - self.started_at.pop(slot, time.monotonic())
        self.say("worker", f"worker {slot} ready in {took:.1f}s (process start, imports, model load)",
                 worker=slot, seconds=round(took, 2))
        if self._short and not self.starting_refs:
            self._short = False
            self._notes.append(Note("workers_back", f"all {len(self.actors)} workers are running again"))

    def _dead_nodes(self) -> set[str]:
        try:
            return {n["NodeID"] for n in self.ray.nodes() if not n["Alive"]}
        except Exception:  # noqa: BLE001 - the node table is news for the user only; never stop a search for it
            return set()

    def _lost(self) -> None:
        """After a death: the pool runs short until a replacement starts; name the nodes Ray has lost, now
        and for a while after (see NODE_WATCH_S)."""
        self._short = True
        self._watch_until = time.monotonic() + NODE_WATCH_S
        self._name_lost_nodes()

    def _name_lost_nodes(self) -> None:
        try:
            nodes = self.ray.nodes()
        except Exception:  # noqa: BLE001 - as in _dead_nodes
            return
        alive = sum(1 for n in nodes if n["Alive"])
        for n in nodes:
            if not n["Alive"] and n["NodeID"] not in self._lost_nodes:
                self._lost_nodes.add(n["NodeID"])
                addr = f"{n.get('NodeManagerAddress', '?')}:{n.get('NodeManagerPort', '?')}"
                self._notes.append(Note("node_lost", f"node {addr} ({n['NodeID'][:8]}) lost; {alive} node(s) left; "
                                        "its workers are replaced where the cluster has room, the search goes on "
                                        "meanwhile"))

    def notes(self) -> list[Note]:
        out, self._notes = self._notes, []
        return out

    def submit(self, task: Task) -> int:
        slot = self.slots.idle.pop()
        handle = next(self._handles)
        self.refs[self.actors[slot].evaluate.remote(*task.args())] = (handle, slot, task)
        return handle

    def wait(self, timeout: float | None = None) -> list[Outcome]:
        """As ``WorkerPool.wait``; returns early (maybe empty) when a worker has started."""
        if not self.refs and not self.starting_refs:
            return []
        refs = [*self.refs, *self.starting_refs]
        ready, rest = self.ray.wait(refs, num_returns=1, timeout=timeout)
        if ready and rest:
            # every task finished by now, not one per call: the loop writes and tells them in one turn
            more, _ = self.ray.wait(rest, num_returns=len(rest), timeout=0)
            ready = [*ready, *more]
        now = time.monotonic()
        if (self._short or now < self._watch_until) and now - self._checked > NODE_CHECK_S:
            self._checked = now  # Ray marks a node dead some seconds after its workers die
            self._name_lost_nodes()
        out = []
        for ref in ready:
            if ref in self.starting_refs:
                self._started(self.starting_refs.pop(ref), ref)
                continue
            handle, slot, task = self.refs.pop(ref)
            name = f"actor-{slot}"
            try:
                res = self.ray.get(ref)
            except self.died_errors as e:
                why = short_reason(e)
                self.ray.kill(self.actors[slot])  # no-op for a dead actor; frees a half-dead one
                self.slots.died(why)
                self._lost()
                self._start(slot)
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

    @property
    def starting(self) -> int:
        return len(self.starting_refs)

    def close(self) -> None:
        for a in self.actors:
            if a is not None:
                self.ray.kill(a)
        self.slots.idle.clear()
        self.refs.clear()
        self.starting_refs.clear()
