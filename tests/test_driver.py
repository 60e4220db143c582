"""Study-loop logic that needs no Ray: the result cache by recipe hash, re-proposals after a crash,
Ctrl-C, and a whole run over the in-process pool (worker deaths included)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from fixtures_models import make_tiny_llama_family, placeholder_tasks

from evomerge.genomes import make_genome
from evomerge.run import InProcessPool, Lease, PoolError, RunError, StudyRun, Task, algorithm_settings, build_algorithm
from evomerge.run.pool import Note
from evomerge.run.problem import search_context
from evomerge.run.progress import EventLog
from evomerge.run.signals import ctrl_c
from evomerge.search import REGISTRY, GenomeLayout, Proposal
from evomerge.space import SearchSpace, dump_space, load_space
from evomerge.store import Store, StudyLocked
from evomerge.view import StudyView

SPACE = """
base_model: {base}
models: [{e0}, {e1}]
genome: {{method: task_arithmetic, layer_groups: model}}
objectives:
  - {{name: a, task: t1, metric: "exact_match,none"}}
  - {{name: b, task: t2, metric: "exact_match,none"}}
algorithm: {{name: {algorithm}}}
budget: {budget}
"""


def _space(tmp_path: Path, algorithm: str = "random", budget: int = 5, extra: str = "") -> SearchSpace:
    base, experts = make_tiny_llama_family(tmp_path, n_experts=2, seed=0)
    placeholder_tasks(tmp_path, ("t1", "t2", "t3"))  # a loaded space's tasks are checked
    if "evaluation: {" in extra:
        extra = extra.replace("evaluation: {", "evaluation: {task_paths: [tasks], ", 1)
    else:
        extra += "evaluation: {task_paths: [tasks]}\n"
    p = tmp_path / "s.yaml"
    p.write_text(SPACE.format(base=base, e0=experts[0], e1=experts[1], algorithm=algorithm, budget=budget)
                 + extra)
    return load_space(p)


def _study(tmp_path: Path, space: SearchSpace) -> Store:
    store = Store(f"sqlite:///{tmp_path / 'd.db'}")
    store.create_study("s", dump_space(space), [{"name": "a", "direction": "maximize"},
                                                {"name": "b", "direction": "maximize"}], budget=space.budget)
    return store


@pytest.fixture
def driver(tmp_path: Path) -> StudyRun:
    space = _space(tmp_path)
    return StudyRun(space, _study(tmp_path, space), "s", show_progress=False)


def _finish(d: StudyRun, scores: dict, timings: dict | None = None) -> int:
    job = d.queue.popleft()
    d.store.mark_running("s", job.number, worker="test")
    d.store.complete_candidate("s", job.number, scores, {"a": [1.0, 0.0], "b": [0.5, 0.0]}, timings or {})
    d._tell(job.key, [scores["a"], scores["b"]])
    return job.number


def _repeat_first_proposal(d: StudyRun, monkeypatch) -> None:
    first = d.store.get_candidate("s", 1)
    nxt = iter(range(100, 200))
    monkeypatch.setattr(d.algo, "ask", lambda n: [Proposal(key=next(nxt), x=list(first.genome))])
    monkeypatch.setattr(d.algo, "tell", lambda results: None)


def test_same_recipe_reuses_scores_without_evaluating(driver: StudyRun, monkeypatch) -> None:
    d = driver
    d._propose(1)
    first = _finish(d, {"a": 0.5, "b": 0.25})
    d.store.add_scores("s", first, {"held_out": 0.9})  # a report score must not travel with the cache
    _repeat_first_proposal(d, monkeypatch)
    d._propose(1)
    assert not d.queue  # nothing to evaluate
    c = d.store.get_candidate("s", 2)
    assert c.state == "complete" and c.recipe_hash == d.store.get_candidate("s", first).recipe_hash
    assert c.scores == {"a": 0.5, "b": 0.25}
    assert c.timings == {"cached_from": float(first)}
    assert d.store.sample_scores("s", 2) == {"a": [1.0, 0.0], "b": [0.5, 0.0]}


def test_multi_fidelity_stop_is_not_reused(driver: StudyRun, monkeypatch) -> None:
    d = driver
    d._propose(1)
    _finish(d, {"a": 0.1, "b": 0.1}, {"fidelity": 0.25, "pruned": 1.0})
    _repeat_first_proposal(d, monkeypatch)
    d._propose(1)
    assert [j.number for j in d.queue] == [2]  # evaluated in full, not copied from a slice


def test_anchor_plan_goes_to_the_workers_once_enough_are_fully_scored(tmp_path: Path) -> None:
    space = _space(tmp_path, budget=8,
                   extra="evaluation: {multi_fidelity: {method: anchors, fraction: 0.5, min_reference: 4}}\n")
    d = StudyRun(space, _study(tmp_path, space), "s", show_progress=False)
    plans = []
    for i in range(5):
        d._propose(1)
        _finish(d, {"a": 0.1 * i, "b": 0.5})
        front, fid = d._fidelity_args()
        assert fid["method"] == "anchors" and front
        plans.append(fid["anchors"])
    assert plans[:3] == [{}, {}, {}]  # every candidate is scored in full until 4 are
    assert set(plans[3]) == {"a", "b"} and plans[3]["a"]["n"] == 2 and len(plans[3]["a"]["indices"]) == 1


def test_ctrl_c_is_a_flag_then_an_interrupt():
    """The search loop's Ctrl-C: the first SIGINT only sets the flag the loop checks between candidates
    (Ray can swallow a KeyboardInterrupt raised inside ray.wait); a second interrupts at once; the
    previous handler comes back afterwards."""
    import os
    import signal

    before = signal.getsignal(signal.SIGINT)
    with ctrl_c() as stop:
        assert not stop.is_set()
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(100):  # the handler runs at the next bytecode boundary
            if stop.is_set():
                break
        assert stop.is_set()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(100):
                pass
    assert signal.getsignal(signal.SIGINT) is before


class FakeWorker:
    """Scores a recipe by its hash (deterministic, instant); ``deaths`` evaluations raise first, as a
    worker that dies would (MergeWorker itself turns a candidate's failure into an error result)."""

    calls: list[int] = []
    deaths = 0

    def evaluate(self, number, recipe_json, objective_names=None, front=None, fidelity=None) -> dict:
        if FakeWorker.deaths > 0:
            FakeWorker.deaths -= 1
            raise RuntimeError("worker lost")
        FakeWorker.calls.append(number)
        h = sum(recipe_json.encode()) % 997 / 997
        scores = {"a": h, "b": 1.0 - h, "held": 0.5}
        names = objective_names or list(scores)
        return {"number": number, "scores": {n: scores[n] for n in names},
                "samples": {n: [scores[n]] for n in names}, "timings": {"materialize_s": 0.01, "evaluate_s": 0.02},
                "error": None, "worker": "fake"}


@pytest.fixture
def fake_worker():
    FakeWorker.calls, FakeWorker.deaths = [], 0
    yield FakeWorker
    FakeWorker.calls, FakeWorker.deaths = [], 0


@pytest.mark.parametrize("algorithm", ["random", "nsga2", "nsga3", "m2n2", "map", "map_nested"])
def test_whole_run_on_the_in_process_pool(tmp_path: Path, fake_worker, algorithm: str) -> None:
    """A run to its budget with every algorithm kind (samples, layout, links derived without the loop
    naming any), a worker death retried, the reference point fixed, and a resume that evaluates nothing."""
    space = _space(tmp_path, algorithm=algorithm, budget=6)
    store = _study(tmp_path, space)
    fake_worker.deaths = 1
    pools: list[InProcessPool] = []

    def pool(cfg):
        pools.append(InProcessPool(FakeWorker, workers=2))
        return pools[-1]

    StudyRun(space, store, "s", show_progress=False, pool=pool).run()
    counts = store.study_counts("s")
    assert counts["complete"] == 6 and counts["failed"] == 0
    # attempts are evaluations that reached a worker: every evaluate call, the one its worker died in
    # included (that candidate was evaluated again); cache hits evaluate nothing
    assert counts["attempts"] == len(fake_worker.calls) + 1
    assert store.get_study("s").status == "done" and store.get_study("s").lease_owner is None
    assert store.get_study("s").reference_point is not None  # bounded metrics: from [0, 1] at the start
    assert {c.worker for c in store.candidates("s")} <= {"inprocess-0", "inprocess-1", "cache"}
    niches = [c.niche for c in store.candidates("s")]
    if algorithm == "m2n2":  # every told result's niche: the examples it holds among the archive
        assert all(isinstance(n["examples"], list) and n["shared_fitness"] >= 0 for n in niches), niches
        assert niches[0]["admitted"] and niches[0]["replaced"] is None
    else:
        assert niches == [None] * 6
    calls = len(fake_worker.calls)
    StudyRun(space, store, "s", show_progress=False, pool=pool).run()  # done: no pool, no evaluation
    assert len(pools) == 1 and len(fake_worker.calls) == calls


def test_pool_notes_are_printed_and_stored_as_events(tmp_path: Path, fake_worker) -> None:
    """A RayPool's news (a node lost, workers back) reaches the user's log as it did, and the store."""
    space = _space(tmp_path, budget=3)
    store = _study(tmp_path, space)
    lost = "node 10.0.0.2:4000 (3cb8d965) lost; 1 node(s) left; its workers are replaced where the cluster ..."

    class NewsPool(InProcessPool):
        news = [[Note("node_lost", lost)], [], [Note("workers_back", "all 2 workers are running again")]]

        def notes(self) -> list[Note]:
            return self.news.pop(0) if self.news else []

    out = io.StringIO()
    StudyRun(space, store, "s", show_progress=False, pool=lambda cfg: NewsPool(FakeWorker, 2),
             log=EventLog("plain", stream=out)).run()
    assert [(e.kind, e.message) for e in store.study_events("s")] == \
        [("node_lost", lost), ("workers_back", "all 2 workers are running again")]
    assert f"worker: {lost}\n" in out.getvalue() and "worker: all 2 workers are running again" in out.getvalue()


@pytest.mark.parametrize("deaths", [0, 100])
def test_report_scoring_survives_a_dead_worker(tmp_path: Path, fake_worker, deaths: int) -> None:
    extra = 'report:\n  - {name: held, task: t3, metric: "exact_match,none"}\n'
    space = _space(tmp_path, budget=4, extra=extra)
    store = _study(tmp_path, space)
    run = StudyRun(space, store, "s", show_progress=False, pool=lambda cfg: InProcessPool(FakeWorker, 1))
    original = run._search

    def search_then_kill(pool):
        original(pool)
        fake_worker.deaths = deaths  # 100: every report evaluation dies, which is reported, not raised

    run._search = search_then_kill
    run.run()
    assert store.study_counts("s")["complete"] == 4
    front = {c.number for c in StudyView(store).front("s")}
    held = {c.number for c in store.candidates("s") if "held" in c.scores}
    assert held == (front if deaths == 0 else set())


def test_worker_deaths_in_a_row_end_the_pool(fake_worker) -> None:
    pool = InProcessPool(FakeWorker, workers=1, max_deaths=3)
    died = 0
    fake_worker.deaths = 2
    for _ in range(2):  # two deaths, a result: the count starts again
        pool.submit(Task(1, "{}", ["a"]))
        (o,) = pool.wait()
        assert o.result is None and o.died == "RuntimeError: worker lost" and pool.idle == 1
    pool.submit(Task(1, "{}", ["a"]))
    assert pool.wait()[0].result["scores"]["a"] >= 0
    fake_worker.deaths = 10
    with pytest.raises(PoolError, match="3 worker deaths in a row.*worker lost"):
        for _ in range(5):
            pool.submit(Task(1, "{}", ["a"]))
            pool.wait()
            died += 1
    assert died == 2


def test_multi_fidelity_with_a_samples_algorithm_is_refused(tmp_path: Path) -> None:
    space = _space(tmp_path, algorithm="m2n2", extra="evaluation: {multi_fidelity: {fraction: 0.25}}\n")
    with pytest.raises(RunError, match="multi_fidelity"):
        StudyRun(space, _study(tmp_path, space), "s", show_progress=False)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_algorithm_is_built_from_what_it_declares(tmp_path: Path, name: str) -> None:
    """The loop builds every registered algorithm without knowing it by name: the settings it derives
    from the objectives (both bounded here) and, when it declares ``needs_layout``, the genome layout."""
    space = _space(tmp_path, algorithm=name)
    genome = make_genome(space)
    cls = REGISTRY[name]
    ctx = search_context(space, genome, cls)
    assert ctx.bounded == (True, True)
    assert (ctx.layout == GenomeLayout(n_sources=2, genes_per_source=1)) if cls.needs_layout else ctx.layout is None
    algo = build_algorithm(space, genome)
    assert type(algo) is cls and algo.dim == genome.dim
    assert algorithm_settings(space, genome) == cls.derive_settings(dict(space.algorithm.settings), ctx)
    if name == "map":
        assert algo.links == ["sigmoid", "sigmoid"]
    if name == "m2n2":
        assert algo.settings["n_sources"] == 2 and algo.granularity == 2


def test_lease_takes_over_from_a_dead_run_of_this_host_only(tmp_path: Path) -> None:
    import socket
    import subprocess
    import sys

    store = Store(f"sqlite:///{tmp_path / 'l.db'}")
    store.create_study("s", "", [{"name": "a", "direction": "maximize"}], budget=1)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    dead = f"{socket.gethostname()}:{int(gone.stdout)}:x"  # a pid that has exited
    store.acquire_lease("s", dead, 600)
    with Lease(store, "s") as lease:
        assert store.get_study("s").lease_owner == lease.owner != dead
        assert not lease.renew_if_due()  # renewed only every renew_s
        lease.renew_s = 0.0
        assert lease.renew_if_due()
    assert store.get_study("s").lease_owner is None
    store.acquire_lease("s", f"otherhost:{int(gone.stdout)}:x", 600)  # another host's pids say nothing here
    with pytest.raises(StudyLocked, match="otherhost"):
        Lease(store, "s").acquire()
