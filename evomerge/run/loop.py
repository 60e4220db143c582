"""The study loop: asks the algorithm, keeps every worker of a pool busy, records everything in the store.

Resume follows from three properties rather than from special cases: the algorithm's state is saved
once per loop turn (after a turn's asks and dispatches, or after the results one wait returned, which
are written in one transaction and told in candidate order); asking is deterministic, so a proposal
made again after a crash gets the same key, and the store hands back the candidate it already holds;
telling a key twice is a no-op. A restarted run therefore loads the latest checkpoint, re-tells what
finished since (in candidate order, as a turn tells), re-dispatches what was queued or running, and
carries on. A crash loses at most the results then in flight (a wait's results are written whole or
not at all). Asking and telling run outside any transaction (they may take seconds).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from rich.console import Console

from evomerge import front as frontlib
from evomerge.genomes import make_genome
from evomerge.objectives import is_bounded
from evomerge.run.anchors import AnchorPlanner
from evomerge.run.hvseries import HypervolumeSeries
from evomerge.run.lease import Lease
from evomerge.run.pool import Outcome, RayPool, Task, WorkerPool, WorkerStartError, slot_label, worker_config
from evomerge.run.problem import build_algorithm
from evomerge.run.progress import EventLog, SearchProgress
from evomerge.run.report import report_todo, score_report
from evomerge.run.signals import ctrl_c
from evomerge.space import SearchSpace
from evomerge.store import Store
from evomerge.view import StudyView
from evomerge.workers import WorkerConfig

WAIT_S = 0.5  # longest the loop waits on workers before it looks at Ctrl-C and the lease again


class RunError(RuntimeError):
    """A search that cannot start or go on; the message is for the user."""


@dataclass
class Job:
    number: int
    key: int
    recipe_json: str


@dataclass
class RunStats:
    driver_s: float = 0.0  # the loop's own time (asking, telling, the store), not the workers'
    timings: list[dict] = field(default_factory=list)


PoolFactory = Callable[[WorkerConfig], WorkerPool]


class StudyRun:
    """One run of a study: ``run()`` searches it to its budget (or to Ctrl-C), then scores the front on
    the report objectives. ``pool`` builds the worker pool once there is work (default: a ``RayPool`` of
    ``workers`` actors, on the cluster at ``ray_address`` if given)."""

    def __init__(
        self,
        space: SearchSpace,
        store: Store,
        study: str,
        workers: int = 1,
        ray_address: str | None = None,
        console: Console | None = None,
        show_progress: bool = True,
        pool: PoolFactory | None = None,
        log: EventLog | None = None,
    ) -> None:
        self.space = space
        self.store = store
        self.study = study
        self.console = console or Console(stderr=True)
        self.log = log or EventLog("rich", self.console)
        self.show_progress = show_progress
        self.pool_factory: PoolFactory = pool or (lambda cfg: RayPool(cfg, workers, ray_address, say=self.log.event))
        self.already_done = False  # run() found nothing left to do (a finished study resumed)
        self.genome = make_genome(space)
        self.directions = [o.direction for o in space.objectives]
        self.names = [o.name for o in space.objectives]
        self.algo = build_algorithm(space, self.genome)
        if space.evaluation.multi_fidelity is not None and self.algo.needs_samples:
            raise RunError(f"evaluation.multi_fidelity cannot be used with {space.algorithm.name}: it learns "
                           "from every example's score, and a stopped candidate has only a slice")
        self.lease = Lease(store, study)
        self.queue: deque[Job] = deque()
        self.inflight: dict[int, Job] = {}  # pool handle -> job
        self.stats = RunStats()
        self.step = 0
        self._ref_fixed = False
        self.hv_series = HypervolumeSeries(store, study, self.names, self.directions)
        self._anchors: AnchorPlanner | None = None
        self._reference: list[float] | None = None  # the study's hypervolume reference point, once fixed
        self._niches: dict[int, Any] = {}  # told since the last checkpoint, written with it

    # -- store <-> algorithm ----------------------------------------------------------------
    def _values(self, scores: dict[str, float]) -> list[float]:
        return [scores[n] for n in self.names]

    def _result(self, key: int, values: list[float] | None, samples: dict[str, list[float]] | None = None,
                number: int | None = None) -> tuple:
        """A tell tuple; algorithms that learn from per-example scores get them appended."""
        if values is None or not self.algo.needs_samples:
            return (key, values)
        if samples is None and number is not None:
            samples = self.store.sample_scores(self.study, number)
        flat = [float(v) for n in self.names for v in (samples or {}).get(n, [])]
        return (key, values, flat)

    def _tell(self, key: int, values: list[float] | None, samples: dict[str, list[float]] | None = None,
              number: int | None = None) -> None:
        self.algo.tell([self._result(key, values, samples, number)])
        self._niches.update(self.algo.take_niches())
        self.step += 1

    def _checkpoint(self) -> None:
        # Once per turn, in one transaction with the niches of its tells: the state is written once for
        # all of them (it was once per tell, the largest share of the driver's time at hundreds of workers).
        with self.store.batch():
            self._record_niches()
            self.store.save_checkpoint(self.study, self.step, self.algo.name, self.algo.state_dict())

    def _record_niches(self) -> None:
        # Written with (or before) the checkpoint that no longer holds them: a crash before it re-tells
        # the result on resume, which gives the same niche again.
        self._niches.update(self.algo.take_niches())
        for key, niche in self._niches.items():
            self.store.set_niche(self.study, key, niche)
        self._niches.clear()

    def _restore(self) -> None:
        ck = self.store.latest_checkpoint(self.study)
        if ck is not None:
            step, name, state = ck
            if name != self.algo.name:
                raise RunError(f"study {self.study!r} was searched with {name}, the space now says {self.algo.name}")
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
        self._record_niches()
        # Whatever was queued or running belonged to a run that is gone.
        for c in self.store.pending_candidates(self.study):
            if c.state == "running":
                self.store.requeue(self.study, c.number)
            self.queue.append(Job(c.number, int(c.proposal_key), c.recipe_json))

    def _propose(self, n: int) -> bool:
        """Ask for up to n new jobs; replayed proposals map onto the candidates already stored. Returns
        whether the algorithm was asked (its state may have changed)."""
        known = {j.number for j in self.queue} | {job.number for job in self.inflight.values()}
        asked = False
        while n > 0:
            room = self.space.budget - self.store.count_candidates(self.study)
            if room <= 0:
                return asked
            props = self.algo.ask(min(n, room))  # outside any transaction: asking may take seconds
            asked = True
            if not props:
                return asked
            rows = []
            for p in props:
                recipe = self.genome.decode(p.x)
                rows.append({"proposal_key": p.key, "genome": list(p.x), "recipe_json": recipe.canonical_json(),
                             "recipe_hash": recipe.hash(), "parents": list(p.parents), "generation": p.generation,
                             "operator": getattr(recipe, "method", recipe.kind)})
            tells: list[tuple] = []  # told after the round's writes, in proposal order (as a resume tells)
            # The round's candidates and cache hits in one transaction: a replayed proposal finds either
            # both or neither.
            with self.store.batch():
                added = self.store.add_candidates(self.study, rows)
                hashes = self.store.complete_by_hash(self.study, [r["recipe_hash"] for r in rows])
                hits = self._cache_hits(rows, added, hashes)
                cached: list[tuple] = []
                for p, row, (number, new) in zip(props, rows, added, strict=True):
                    if not new:  # a proposal replayed after a restart: the store has its fate
                        cand = self.store.get_candidate(self.study, number)
                        if cand.state == "complete":
                            tells.append((p.key, self._values(cand.scores), None, number))
                            continue
                        if cand.state == "failed":
                            tells.append((p.key, None, None, None))
                            continue
                    hit = hits.get(number)
                    if hit is not None:  # same recipe as a finished candidate: its scores, not an evaluation
                        scores, samples = hit
                        cached.append((number, scores, samples, {"cached_from": float(hashes[row["recipe_hash"]])}))
                        tells.append((p.key, self._values(scores), samples, None))
                        continue
                    if number not in known:
                        self.queue.append(Job(number, p.key, row["recipe_json"]))
                        known.add(number)
                        n -= 1
                if cached:
                    self.store.mark_running_many(self.study, [(c[0], "cache") for c in cached])
                    self.store.complete_candidates(self.study, cached)
            for key, values, samples, number in tells:
                self._tell(key, values, samples, number)
        return asked

    def _cache_hits(self, rows: list[dict], added: list[tuple[int, bool]],
                    hashes: dict[str, int]) -> dict[int, tuple[dict, dict]]:
        """Per new candidate whose recipe a complete candidate already has: that one's (scores, samples)."""
        first = {number: hashes[r["recipe_hash"]] for r, (number, new) in zip(rows, added, strict=True)
                 if new and r["recipe_hash"] in hashes and hashes[r["recipe_hash"]] != number}
        if not first:
            return {}
        sources = {c.number: c for c in self.store.get_candidates(self.study, sorted(set(first.values())))}
        samples = self.store.sample_scores_many(self.study, sorted(sources))
        out = {}
        for number, hit in first.items():
            src = sources[hit]
            if (src.timings or {}).get("pruned"):
                continue  # a multi-fidelity stop holds slice scores only: evaluate this one in full
            scores = {n: src.scores[n] for n in self.names}  # not the held-out report scores of a front member
            out[number] = (scores, {n: samples.get(hit, {}).get(n, []) for n in self.names})
        return out

    # -- the reference point ------------------------------------------------------------------
    def _ensure_reference_point(self) -> None:
        """Fix the study's hypervolume reference point once: from known bounds (every objective in
        [0, 1]) at the start, otherwise from the results there are when the first ones are in; then
        record the hypervolume series up to the results there are."""
        self._fix_reference_point()
        self.hv_series.update()

    def _fix_reference_point(self) -> None:
        if self._ref_fixed or self.store.get_study(self.study).reference_point is not None:
            self._ref_fixed = True
            return
        if all(is_bounded(o) for o in self.space.objectives):
            ref = frontlib.reference_point_from_bounds([(0.0, 1.0)] * len(self.names), self.directions)
        else:
            F = self.complete_values()
            if len(F) == 0:
                return
            ref = frontlib.reference_point(frontlib.to_minimization(F, self.directions))
        self.store.set_reference_point(self.study, [float(v) for v in ref])
        self._ref_fixed = True

    # -- workers ----------------------------------------------------------------------------
    def _dispatch(self, pool: WorkerPool) -> None:
        if not pool.idle:
            return
        asked = self._propose(pool.idle - len(self.queue))
        running = []
        while pool.idle and self.queue:
            job = self.queue.popleft()
            handle = pool.submit(Task(job.number, job.recipe_json, self.names, *self._fidelity_args()))
            running.append((job.number, pool.worker_of(handle)))
            self.inflight[handle] = job
        with self.store.batch():
            self.store.mark_running_many(self.study, running)
            if asked:
                self._checkpoint()

    def _handle_all(self, done: list[Outcome]) -> None:
        """A wait's results in one transaction, then told in candidate order (a resume re-tells what
        the last checkpoint misses in that order too), then one checkpoint. The telling is outside any
        transaction: it may take a while, and SQLite's write lock would be held meanwhile."""
        outcomes = sorted(done, key=lambda o: self.inflight[o.handle].number)
        results = [o for o in outcomes if o.died is None and not (o.result or {}).get("error")]
        with self.store.batch():
            states = self.store.complete_candidates(
                self.study, [(self.inflight[o.handle].number, o.result["scores"], o.result["samples"],
                              o.result["timings"]) for o in results], attempt=True)  # type: ignore[index]
        state_of = {o.handle: st for o, st in zip(results, states, strict=True)}
        for o in outcomes:
            if o.handle not in state_of:
                self._handle(o)  # a death or an error: rare, written as it comes
                continue
            job = self.inflight.pop(o.handle)
            res = o.result or {}
            self.stats.timings.append(res["timings"])
            if state_of[o.handle] == "failed":
                self._tell(job.key, None)
            else:
                self._tell(job.key, self._values(res["scores"]), res["samples"])
        with self.store.batch():
            self._checkpoint()
            self._ensure_reference_point()

    def _fidelity_args(self) -> tuple:
        """(front, fidelity) for multi-fidelity evaluation: the current front, in objective order."""
        fid = self.space.evaluation.multi_fidelity
        if fid is None:
            return ()
        F = self.complete_values()
        if len(F) == 0:
            return (None, None)
        nd = frontlib.non_dominated(frontlib.to_minimization(F, self.directions))
        args = fid.model_dump()
        if fid.method == "anchors":
            if self._anchors is None:
                self._anchors = AnchorPlanner(self.store, self.study, self.space, fid)
            args["anchors"] = self._anchors.plan()
        if fid.min_gain > 0.0:
            if self._reference is None:
                self._fix_reference_point()
                self._reference = self.store.get_study(self.study).reference_point
            args["reference"] = self._reference
        return (F[nd].tolist(), args)

    def _say(self, line: str) -> None:
        self.log.event("worker", line)

    def _handle(self, o: Outcome) -> None:
        job = self.inflight.pop(o.handle)
        if o.died is not None:
            self.store.count_attempt(self.study, job.number)  # it reached a worker, which died on it
            # The worker died (OOM, node lost); the pool replaced it. Retry the candidate a bounded
            # number of times, counted in the store so that the bound holds across restarts.
            cand = self.store.get_candidate(self.study, job.number)
            tries = self.space.evaluation.max_attempts
            who = slot_label(o.worker)
            if cand.attempts >= tries:
                self.store.fail_candidate(self.study, job.number, f"worker died {cand.attempts} times: {o.died}")
                self._tell(job.key, None)
                self._say(f"{who} died ({o.died}) while evaluating #{job.number}; "
                          f"failed after {cand.attempts}/{tries} attempts")
            else:
                self.store.requeue(self.study, job.number)
                self.queue.appendleft(job)
                self._say(f"{who} died ({o.died}) while evaluating #{job.number}; "
                          f"retrying, attempt {cand.attempts + 1}/{tries}")
            return
        res = o.result or {}
        if res.get("error"):
            self.store.fail_candidate(self.study, job.number, res["error"], attempt=True)
            self._tell(job.key, None)
            return
        state = self.store.complete_candidate(self.study, job.number, res["scores"], res["samples"],
                                              res["timings"], attempt=True)
        self.stats.timings.append(res["timings"])
        if state == "failed":
            self._tell(job.key, None)
        else:
            self._tell(job.key, self._values(res["scores"]), res["samples"])

    # -- the run ----------------------------------------------------------------------------
    def run(self) -> None:
        self.lease.acquire()
        try:
            if self._finished() and not self._report_todo():
                # nothing to do: the study keeps its record (a resume of a finished study changes nothing)
                self.already_done = True
                if self.store.get_study(self.study).status != "done":
                    self.store.set_study_status(self.study, "done")
                return
            self.store.set_study_status(self.study, "running")
            self._restore()
            self._ensure_reference_point()
            self._loop()
            self.hv_series.update()  # what the last round and the report scoring finished
            self.store.set_study_status(self.study, "done" if self._finished() else "paused")
        except KeyboardInterrupt:
            # Ctrl-C is a pause the user asked for. Any other end leaves "running", which the view reads
            # as "interrupted" once this run's lease is gone: a crash, kill -9, a lost node.
            self.store.set_study_status(self.study, "paused")
            raise
        except WorkerStartError:
            # Nothing was handed to the worker that could not start: put back what others had in flight
            # and leave the study resumable once the cause (a model, a task, memory) is fixed.
            for job in self.inflight.values():
                self.store.requeue(self.study, job.number)
            self.inflight.clear()
            self.store.set_study_status(self.study, "paused")
            raise
        finally:
            self.lease.release()

    def _finished(self) -> bool:
        counts = self.store.study_counts(self.study)
        return counts["complete"] + counts["failed"] >= self.space.budget

    def _report_todo(self) -> bool:
        return self._finished() and bool(report_todo(self.store, self.study, self.space))

    def _loop(self) -> None:
        if self._finished() and not self._report_todo():
            return
        pool = self.pool_factory(worker_config(self.space))
        try:
            self._search(pool)
            if self._report_todo():
                score_report(self.store, self.study, self.space, pool, lambda m: self.log.event("report", m))
        finally:
            pool.close()

    def _search(self, pool: WorkerPool) -> None:
        progress = SearchProgress(StudyView(self.store), self.study, self.space.budget, self.console,
                                  enabled=self.show_progress, log=self.log)
        with progress, ctrl_c() as stop:
            while True:
                if stop.is_set():
                    raise KeyboardInterrupt
                t0 = time.perf_counter()
                self._dispatch(pool)
                self.stats.driver_s += time.perf_counter() - t0
                if not self.inflight and not (pool.starting and (self.queue or not self._finished())):
                    break  # nothing in flight, and no worker starting that there is work for
                done = pool.wait(WAIT_S)
                for note in pool.notes():
                    self._say(note.message)
                    # kept for `status` and the dashboard; a store that cannot take this small write
                    # cannot take the results either, so it fails the run as they would
                    self.store.add_study_event(self.study, note.kind, note.message)
                t0 = time.perf_counter()
                if done:
                    self._handle_all(done)
                renew = self.lease.renew_if_due()
                if renew:
                    self.store.heartbeat(self.study, [job.number for job in self.inflight.values()])
                self.stats.driver_s += time.perf_counter() - t0
                if done or renew:  # not on every short wait: an update reads the store
                    progress.update()

    # -- figures ------------------------------------------------------------------------------
    def complete_values(self) -> np.ndarray:
        """Objective values of every complete candidate scored in full, in objective order."""
        rows = [c for c in self.store.candidates(self.study, state="complete") if not c.estimated]
        if not rows:
            return np.zeros((0, len(self.names)))
        return np.array([self._values(c.scores) for c in rows], dtype=float)
