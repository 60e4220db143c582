"""The search driver: asks the algorithm, keeps every worker busy, records everything in the store.

Resume follows from three properties rather than from special cases: the algorithm's state is saved
after every ask and tell; asking is deterministic, so a proposal made again after a crash gets the same
key, and the store hands back the candidate it already holds; telling a key twice is a no-op. A
restarted driver therefore loads the latest checkpoint, re-tells what finished since, re-dispatches
what was queued or running, and carries on.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

import numpy as np
from rich.console import Console

from evomerge import front as frontlib
from evomerge.genomes import make_genome
from evomerge.search import make_algorithm
from evomerge.space import SearchSpace, portable_space
from evomerge.store import Store, StudyLocked
from evomerge.workers import MergeWorker, WorkerConfig

LEASE_TTL_S = 60.0
LEASE_RENEW_S = 15.0
WAIT_S = 0.5  # longest the loop waits on workers before it looks at Ctrl-C and the lease again


@contextlib.contextmanager
def _ctrl_c():
    """Ctrl-C as a flag the search loop checks between candidates (a second Ctrl-C interrupts at once).

    A KeyboardInterrupt raised while the main thread is inside ``ray.wait`` can be lost in Ray's own
    signal checks (seen: a search ran to its budget after SIGINT), so the handler only records it and
    the loop raises it itself, at a point where the store and the algorithm's checkpoint agree.
    """
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop  # signal handlers live in the main thread; elsewhere Ctrl-C is the caller's
        return

    def on_sigint(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)
# lm-eval metrics known to lie in [0, 1], so a study's reference point can be fixed before any result.
BOUNDED_METRICS = {"exact_match", "acc", "acc_norm", "f1", "mcc", "bleu_acc", "pass@1"}


class DriverError(RuntimeError):
    """A search that cannot start or go on; the message is for the user."""


@dataclass
class Job:
    number: int
    key: int
    recipe_json: str


@dataclass
class DriverStats:
    driver_s: float = 0.0
    told: int = 0
    timings: list[dict] = field(default_factory=list)


def _bounded(o) -> bool:
    return o.kind == "lm_eval" and o.metric.split(",")[0] in BOUNDED_METRICS


def algorithm_settings(space: SearchSpace, genome) -> dict:
    """The space's algorithm settings plus what an algorithm needs to know of the genome and metrics."""
    settings = dict(space.algorithm.settings)
    if space.algorithm.name == "map" and "links" not in settings:
        # MAP's surrogate needs a link per objective: accuracies live in [0, 1] (sigmoid), others don't.
        settings["links"] = ["sigmoid" if _bounded(o) else "identity" for o in space.objectives]
    if space.algorithm.name == "m2n2" and hasattr(genome, "n_sources"):
        # M2N2 seeds its archive with each source model alone and splits at layer-group boundaries,
        # so that a child of recipes is a recipe (per-group coefficients); it needs the layout.
        settings.setdefault("n_sources", genome.n_sources)
        settings.setdefault("genes_per_source", genome.genes_per_source)
        settings.setdefault("split_granularity", "group")
    return settings


def owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _owner_is_dead_here(owner: str | None) -> bool:
    """A lease left by a driver of this host whose process is gone (kill -9) can be taken at once."""
    if not owner:
        return False
    parts = owner.split(":")
    if len(parts) < 2 or parts[0] != socket.gethostname():
        return False
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError):
        return False
    return False


def worker_config(space: SearchSpace) -> WorkerConfig:
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


class Driver:
    def __init__(
        self,
        space: SearchSpace,
        store: Store,
        study: str,
        workers: int = 1,
        ray_address: str | None = None,
        console: Console | None = None,
        show_progress: bool = True,
    ):
        self.space = space
        self.store = store
        self.study = study
        self.n_workers = workers
        self.ray_address = ray_address
        self.console = console or Console(stderr=True)
        self.show_progress = show_progress
        self.genome = make_genome(space)
        self.directions = [o.direction for o in space.objectives]
        self.names = [o.name for o in space.objectives]
        settings = algorithm_settings(space, self.genome)
        self.algo = make_algorithm(
            space.algorithm.name,
            dim=self.genome.dim,
            directions=self.directions,
            seed=space.seed,
            weights=[o.weight for o in space.objectives],
            **settings,
        )
        if space.evaluation.multi_fidelity is not None and getattr(self.algo, "uses_samples", False):
            raise DriverError(f"evaluation.multi_fidelity cannot be used with {space.algorithm.name}: it learns "
                              "from every example's score, and a stopped candidate has only a slice")
        self.owner = owner_id()
        self.queue: deque[Job] = deque()
        self.inflight: dict = {}  # ObjectRef -> (actor index, Job)
        self.stats = DriverStats()
        self.step = 0

    # -- store <-> algorithm ----------------------------------------------------------------
    def _values(self, scores: dict[str, float]) -> list[float]:
        return [scores[n] for n in self.names]

    def _result(self, key: int, values: list[float] | None, samples: dict[str, list[float]] | None = None,
                number: int | None = None) -> tuple:
        """A tell tuple; algorithms that learn from per-example scores (M2N2) get them appended."""
        if values is None or not getattr(self.algo, "uses_samples", False):
            return (key, values)
        if samples is None and number is not None:
            samples = self.store.sample_scores(self.study, number)
        flat = [float(v) for n in self.names for v in (samples or {}).get(n, [])]
        return (key, values, flat)

    def _tell(self, key: int, values: list[float] | None, samples: dict[str, list[float]] | None = None,
              number: int | None = None) -> None:
        self.algo.tell([self._result(key, values, samples, number)])
        self.step += 1
        self.store.save_checkpoint(self.study, self.step, self.algo.name, self.algo.state_dict())

    def _restore(self) -> None:
        ck = self.store.latest_checkpoint(self.study)
        if ck is not None:
            step, name, state = ck
            if name != self.algo.name:
                raise DriverError(f"study {self.study!r} was searched with {name}, the space now says {self.algo.name}")
            self.algo.load_state_dict(state)
            self.step = step
        # Results that landed after the last checkpoint: the ones the restored algorithm still waits for.
        waiting = set(self.algo.outstanding)
        for c in self.store.candidates(self.study):
            if int(c.proposal_key) not in waiting:
                continue
            if c.state == "complete":
                self.algo.tell([self._result(int(c.proposal_key), self._values(c.scores), number=c.number)])
            elif c.state == "failed":
                self.algo.tell([(int(c.proposal_key), None)])
        # Whatever was queued or running belonged to a driver that is gone.
        for c in self.store.pending_candidates(self.study):
            if c.state == "running":
                self.store.requeue(self.study, c.number)
            self.queue.append(Job(c.number, int(c.proposal_key), c.recipe_json))

    def _created(self) -> int:
        return self.store.count_candidates(self.study)

    def _propose(self, n: int) -> None:
        """Ask for up to n new jobs; replayed proposals map onto the candidates already stored."""
        known = {j.number for j in self.queue} | {job.number for _, job in self.inflight.values()}
        while n > 0:
            room = self.space.budget - self._created()
            if room <= 0:
                return
            props = self.algo.ask(min(n, room))
            if not props:
                return
            for p in props:
                recipe = self.genome.decode(p.x)
                rjson = recipe.canonical_json()
                number = self.store.add_candidate(
                    self.study,
                    proposal_key=p.key,
                    genome=list(p.x),
                    recipe_json=rjson,
                    recipe_hash=recipe.hash(),
                    parents=list(p.parents),
                    generation=p.generation,
                    operator=getattr(recipe, "method", recipe.kind),
                )
                cand = self.store.get_candidate(self.study, number)
                if cand.state == "complete":
                    self._tell(p.key, self._values(cand.scores), number=number)
                    continue
                if cand.state == "failed":
                    self._tell(p.key, None)
                    continue
                if self._from_cache(cand):
                    continue
                if number not in known:
                    self.queue.append(Job(number, p.key, rjson))
                    known.add(number)
                    n -= 1
            self.store.save_checkpoint(self.study, self.step, self.algo.name, self.algo.state_dict())

    def _from_cache(self, cand) -> bool:
        """Same recipe as a finished candidate: reuse its scores instead of evaluating again."""
        hit = self.store.find_by_hash(self.study, cand.recipe_hash)
        if hit is None or hit.number == cand.number or (hit.timings or {}).get("pruned"):
            return False  # a multi-fidelity stop holds slice scores only: evaluate this one in full
        scores = {n: hit.scores[n] for n in self.names}  # not the held-out report scores of a front member
        samples = {n: self.store.sample_scores(self.study, hit.number).get(n, []) for n in self.names}
        self.store.mark_running(self.study, cand.number, worker="cache")
        self.store.complete_candidate(self.study, cand.number, scores, samples, {"cached_from": float(hit.number)})
        self._tell(int(cand.proposal_key), self._values(scores), samples)
        return True

    # -- workers ----------------------------------------------------------------------------
    def _start_ray(self):
        import ray

        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        env = {
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "RAY_AUTH_MODE": "disabled",
        }
        for k in ("EVOMERGE_ZOO_DIR", "HF_HOME", "EVOMERGE_THREADS"):
            if k in os.environ:
                env[k] = os.environ[k]
        if not ray.is_initialized():
            kwargs = dict(
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
                runtime_env={"env_vars": env},
            )
            if self.ray_address:
                ray.init(address=self.ray_address, **kwargs)
            else:
                ray.init(num_cpus=max(1, self.n_workers), **kwargs)
        gpus = ray.cluster_resources().get("GPU", 0)
        self.actor_opts = {"num_gpus": 1, "num_cpus": 1} if gpus >= 1 else {"num_cpus": 1}
        self.remote_cls = ray.remote(MergeWorker)
        cfg = worker_config(self.space)
        self.cfg = cfg
        self.actors = [self._new_actor() for _ in range(self.n_workers)]
        self.idle = list(range(self.n_workers))
        return ray

    def _new_actor(self):
        return self.remote_cls.options(max_restarts=0, **self.actor_opts).remote(self.cfg)

    def _dispatch(self, ray) -> None:
        self._propose(len(self.idle) - len(self.queue))
        while self.idle and self.queue:
            i = self.idle.pop()
            job = self.queue.popleft()
            self.store.mark_running(self.study, job.number, worker=f"actor-{i}")
            ref = self.actors[i].evaluate.remote(job.number, job.recipe_json, self.names, *self._fidelity_args())
            self.inflight[ref] = (i, job)

    def _fidelity_args(self) -> tuple:
        """(front, fidelity) for multi-fidelity evaluation: the current front, in objective order."""
        fid = self.space.evaluation.multi_fidelity
        if fid is None:
            return ()
        F = self.front_values()
        if len(F) == 0:
            return (None, None)
        nd = frontlib.non_dominated(frontlib.to_minimization(F, self.directions))
        return (F[nd].tolist(), fid.model_dump())

    def _handle(self, ray, ref) -> None:
        i, job = self.inflight.pop(ref)
        try:
            res = ray.get(ref)
        except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as e:
            # The worker died (OOM, node lost): replace it, retry the candidate a bounded number of times.
            self.actors[i] = self._new_actor()
            self.idle.append(i)
            cand = self.store.get_candidate(self.study, job.number)
            if cand.attempts >= self.space.evaluation.max_attempts:
                self.store.fail_candidate(self.study, job.number, f"worker died {cand.attempts} times: {e}")
                self._tell(job.key, None)
            else:
                self.store.requeue(self.study, job.number)
                self.queue.appendleft(job)
            return
        self.idle.append(i)
        if res["error"]:
            self.store.fail_candidate(self.study, job.number, res["error"])
            self._tell(job.key, None)
            return
        state = self.store.complete_candidate(
            self.study, job.number, res["scores"], res["samples"], res["timings"]
        )
        self.stats.timings.append(res["timings"])
        if state == "failed":
            self._tell(job.key, None)
        else:
            self._tell(job.key, self._values(res["scores"]), res["samples"])

    # -- the loop ---------------------------------------------------------------------------
    def _acquire(self) -> None:
        try:
            self.store.acquire_lease(self.study, self.owner, LEASE_TTL_S)
        except StudyLocked as e:
            st = self.store.get_study(self.study)
            if _owner_is_dead_here(st.lease_owner):
                self.store.acquire_lease(self.study, self.owner, LEASE_TTL_S, force=st.lease_owner)
            else:
                raise DriverError(str(e)) from None

    def run(self) -> None:
        self._acquire()
        try:
            self.store.set_study_status(self.study, "running")
            self._restore()
            self._loop()
            done = self._finished()
            self.store.set_study_status(self.study, "done" if done else "paused")
        finally:
            self.store.release_lease(self.study, self.owner)

    def _finished(self) -> bool:
        counts = self.store.study_counts(self.study)
        return counts["complete"] + counts["failed"] >= self.space.budget

    def _loop(self) -> None:
        from evomerge.progress import SearchProgress

        if self._finished() and not self._report_todo():
            return
        ray = self._start_ray()
        last_renew = time.monotonic()
        with SearchProgress(self, enabled=self.show_progress) as progress, _ctrl_c() as stop:
            while True:
                if stop.is_set():
                    raise KeyboardInterrupt
                t0 = time.perf_counter()
                self._dispatch(ray)
                self.stats.driver_s += time.perf_counter() - t0
                if not self.inflight:
                    break
                ready, _ = ray.wait(list(self.inflight), num_returns=1, timeout=WAIT_S)
                t0 = time.perf_counter()
                for ref in ready:
                    self._handle(ray, ref)
                renew = time.monotonic() - last_renew > LEASE_RENEW_S
                if renew:
                    self.store.renew_lease(self.study, self.owner, LEASE_TTL_S)
                    self.store.heartbeat(self.study, [job.number for _, job in self.inflight.values()])
                    last_renew = time.monotonic()
                self.stats.driver_s += time.perf_counter() - t0
                if ready or renew:  # not on every short wait: an update reads the store
                    progress.update()
        self._report_front(ray)
        for a in self.actors:
            ray.kill(a)

    def _report_todo(self) -> list:
        """Front members not yet scored on the report objectives (only once the search is finished)."""
        names = {o.name for o in self.space.report}
        if not names or not self._finished():
            return []
        return [c for c in self.store.front(self.study) if not names <= set(c.scores)]

    def _report_front(self, ray) -> None:
        """Score the final front on the held-out report objectives (never used to steer the search)."""
        names = [o.name for o in self.space.report]
        todo = self._report_todo()
        if not todo:
            return
        self.console.print(f"scoring the front's {len(todo)} candidates on held-out {', '.join(names)}")
        pending: dict = {}
        while todo or pending:
            while todo and self.idle:
                i, c = self.idle.pop(), todo.pop()
                pending[self.actors[i].evaluate.remote(c.number, c.recipe_json, names)] = i
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                self.idle.append(pending.pop(ref))
                res = ray.get(ref)
                if res["error"]:
                    first = res["error"].splitlines()[0]
                    self.console.print(f"candidate {res['number']}: held-out scoring failed: {first}")
                    continue
                self.store.add_scores(self.study, res["number"], res["scores"], res["samples"])

    # -- figures for progress and reports ------------------------------------------------------
    def front_values(self) -> np.ndarray:
        rows = [c for c in self.store.candidates(self.study, state="complete")]
        if not rows:
            return np.zeros((0, len(self.names)))
        return np.array([self._values(c.scores) for c in rows], dtype=float)

    def reference_point(self, F_min: np.ndarray) -> np.ndarray:
        """Fixed per study: from known bounds (accuracy-like metrics lie in [0, 1]) or the first results."""
        st = self.store.get_study(self.study)
        if st.reference_point is not None:
            return np.asarray(st.reference_point, dtype=float)
        if all(_bounded(o) for o in self.space.objectives):
            ref = frontlib.reference_point_from_bounds([(0.0, 1.0)] * len(self.names), self.directions)
        else:
            ref = frontlib.reference_point(F_min)
        self.store.set_reference_point(self.study, [float(v) for v in ref])
        return ref
