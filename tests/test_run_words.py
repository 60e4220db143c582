"""Words that mean one thing: Ctrl-C stores ``paused``, a killed driver reads ``interrupted``,
``attempts`` counts evaluations that reached a worker, and a refused run says how to take over.
Also the resume property the kill -9 end-to-end test cannot see: a resumed search evaluates again only
what was in flight, and ends with the uninterrupted run's candidates and scores."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fixtures_models import make_tiny_llama_family, placeholder_tasks
from typer.testing import CliRunner

from evomerge.cli import app
from evomerge.run import InProcessPool, Outcome, StudyRun
from evomerge.space import SearchSpace, dump_space, load_space
from evomerge.store import Store
from evomerge.view import StudyView, effective_state

SPACE = """
base_model: {base}
models: [{e0}, {e1}]
genome: {{method: task_arithmetic, layer_groups: model}}
objectives:
  - {{name: a, task: t1, metric: "exact_match,none"}}
  - {{name: b, task: t2, metric: "exact_match,none"}}
algorithm: {{name: {algorithm}, settings: {settings}}}
budget: {budget}
seed: 3
evaluation: {{task_paths: [tasks]}}
"""


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> tuple[Path, list[Path]]:
    return make_tiny_llama_family(tmp_path_factory.mktemp("fam"), n_experts=2, seed=0)


def _space(tmp: Path, family, algorithm: str = "random", budget: int = 8) -> SearchSpace:
    base, experts = family
    settings = "{pop_size: 4}" if algorithm == "nsga2" else "{}"
    placeholder_tasks(tmp, ("t1", "t2"))
    p = tmp / "s.yaml"
    p.write_text(SPACE.format(base=base, e0=experts[0], e1=experts[1], algorithm=algorithm, settings=settings,
                              budget=budget))
    return load_space(p)


def _store(tmp: Path, space: SearchSpace, name: str = "d.db") -> Store:
    store = Store(f"sqlite:///{tmp / name}")
    store.create_study("s", dump_space(space), [{"name": "a", "direction": "maximize"},
                                                {"name": "b", "direction": "maximize"}], budget=space.budget)
    return store


class CountingWorker:
    """Scores a recipe by its bytes (deterministic, instant) and counts ``evaluate`` calls per candidate
    number: the evaluations that reached a worker. ``on_call`` runs inside an evaluation."""

    calls: Counter = Counter()
    on_call = None

    def evaluate(self, number, recipe_json, objective_names=None, front=None, fidelity=None) -> dict:
        CountingWorker.calls[number] += 1
        if CountingWorker.on_call is not None:
            CountingWorker.on_call(number)
        h = sum(recipe_json.encode()) % 997 / 997
        scores = {"a": h, "b": 1.0 - h}
        names = objective_names or list(scores)
        return {"number": number, "scores": {n: scores[n] for n in names}, "samples": {n: [scores[n]] for n in names},
                "timings": {"evaluate_s": 0.0}, "error": None, "worker": "counting"}


@pytest.fixture
def worker():
    CountingWorker.calls, CountingWorker.on_call = Counter(), None
    yield CountingWorker
    CountingWorker.calls, CountingWorker.on_call = Counter(), None


class CrashingPool(InProcessPool):
    """A driver killed after ``after`` results: the evaluation that would have been the next result
    ran on its worker, but the driver dies before it hears of it; other tasks stay in flight."""

    def __init__(self, after: int) -> None:
        super().__init__(CountingWorker, workers=2)
        self.after = after
        self.results = 0

    def wait(self, timeout: float | None = None) -> list[Outcome]:
        out = super().wait(timeout)
        if self.results + len(out) > self.after:
            raise SystemExit("driver killed")  # not an Exception: nothing in the loop may catch it
        self.results += len(out)
        return out


def _final(store: Store) -> list[tuple]:
    return [(c.number, c.recipe_hash, c.state, c.scores) for c in store.candidates("s")]


def _pool(cfg) -> InProcessPool:
    return InProcessPool(CountingWorker, workers=2)


@pytest.mark.parametrize(("algorithm", "after"), [("random", 1), ("random", 4), ("nsga2", 3), ("nsga2", 6)])
def test_resume_evaluates_only_what_was_in_flight(tmp_path: Path, family, worker, algorithm: str,
                                                  after: int) -> None:
    space = _space(tmp_path, family, algorithm)
    ref = _store(tmp_path, space, "ref.db")
    StudyRun(space, ref, "s", show_progress=False, pool=_pool).run()
    ref_calls = Counter(worker.calls)
    assert set(ref_calls.values()) == {1} and len(ref_calls) == space.budget

    worker.calls = Counter()
    store = _store(tmp_path, space)
    with pytest.raises(SystemExit):
        StudyRun(space, store, "s", show_progress=False, pool=lambda cfg: CrashingPool(after)).run()
    done = {c.number for c in store.candidates("s", "complete")}
    in_flight = {c.number for c in store.candidates("s", "running")}
    assert len(done) == after and in_flight
    assert StudyView(store).state("s") == "interrupted"  # the crashed run is gone; its lease with it
    before = Counter(worker.calls)

    StudyRun(space, store, "s", show_progress=False, pool=_pool).run()
    again = Counter(worker.calls) - before
    assert not set(again) & done, "a completed candidate was evaluated again"
    assert {n for n in again if before[n]} <= in_flight  # evaluated twice only if in flight at the crash
    assert all(n <= 1 for n in again.values()) and all(n <= 2 for n in worker.calls.values())
    assert _final(store) == _final(ref)
    assert store.get_study("s").status == "done"
    # The workers ran one evaluation more than the budget (the one whose result died with the driver);
    # attempts count the evaluations whose worker reported: one per candidate.
    assert sum(worker.calls.values()) == space.budget + 1
    assert [c.attempts for c in store.candidates("s")] == [1] * space.budget


def test_ctrl_c_pauses_and_charges_nothing_in_flight(tmp_path: Path, family, worker) -> None:
    space = _space(tmp_path, family, budget=6)
    store = _store(tmp_path, space)
    worker.on_call = lambda number: os.kill(os.getpid(), signal.SIGINT) if number == 2 else None
    with pytest.raises(KeyboardInterrupt):
        StudyRun(space, store, "s", show_progress=False, pool=_pool).run()
    st = store.get_study("s")
    assert st.status == "paused" and st.lease_owner is None
    assert StudyView(store).state("s") == "paused"
    res = CliRunner().invoke(app, ["status", "--storage", f"sqlite:///{tmp_path / 'd.db'}"])
    assert res.exit_code == 0 and "paused" in res.output and "interrupted" not in res.output, res.output
    # one task was still in flight on the other worker and never evaluated: not charged
    assert sum(c.attempts for c in store.candidates("s")) == sum(worker.calls.values())
    assert any(c.state == "running" and c.attempts == 0 for c in store.candidates("s"))
    worker.on_call = None
    StudyRun(space, store, "s", show_progress=False, pool=_pool).run()
    assert store.get_study("s").status == "done"
    assert set(worker.calls.values()) == {1}


def test_killed_driver_reads_interrupted(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    later = now + timedelta(seconds=600)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    dead = f"{socket.gethostname()}:{int(gone.stdout)}:x"
    alive = f"{socket.gethostname()}:{os.getpid()}:x"
    assert effective_state("running", later, now, dead) == "interrupted"  # its lease has not even lapsed
    assert effective_state("running", later, now, alive) == "running"
    assert effective_state("running", later, now, "otherhost:1:x") == "running"  # nothing here can tell
    assert effective_state("running", now - timedelta(seconds=1), now, alive) == "interrupted"
    assert effective_state("paused", None, now, dead) == "paused"

    store = Store(f"sqlite:///{tmp_path / 'k.db'}")
    store.create_study("s", "", [{"name": "a", "direction": "maximize"}], budget=1)
    store.acquire_lease("s", dead, 600)
    view = StudyView(store)
    assert view.state("s") == "interrupted" and view.summary("s").state == "interrupted"
    assert view.studies()[0]["state"] == "interrupted"


def test_refused_run_says_until_when_and_how_to_take_over(tmp_path: Path, family, worker) -> None:
    space = _space(tmp_path, family, budget=2)
    store = _store(tmp_path, space)
    StudyRun(space, store, "s", show_progress=False, pool=_pool).run()  # done: resume starts no worker
    holder = "otherhost:4242:abcd1234"
    expires = store.acquire_lease("s", holder, 600)
    cmd = [sys.executable, "-m", "evomerge.cli", "resume", "s", "--storage", f"sqlite:///{tmp_path / 'd.db'}",
           "--no-progress"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert holder in lines[0] and expires.strftime("%Y-%m-%d %H:%M:%S") in lines[0]
    assert "wait" in lines[0] and "evomerge resume s --force-unlock" in lines[0]
    assert store.get_study("s").lease_owner == holder  # refused: nothing changed

    r = subprocess.run([*cmd, "--force-unlock"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"over from {holder}" in r.stderr
    st = store.get_study("s")
    assert st.lease_owner is None and st.status == "done"


def test_resuming_a_finished_study_changes_nothing_and_says_so(tmp_path: Path, family, worker) -> None:
    space = _space(tmp_path, family, budget=2)
    store = _store(tmp_path, space)
    first = StudyRun(space, store, "s", show_progress=False, pool=_pool)
    first.run()
    assert not first.already_done
    before = store.get_study("s")
    calls = sum(worker.calls.values())
    again = StudyRun(space, store, "s", show_progress=False, pool=_pool)
    again.run()
    after = store.get_study("s")
    assert again.already_done and sum(worker.calls.values()) == calls
    assert (after.status, after.updated) == ("done", before.updated)  # `status` keeps its elapsed time
