"""StudyView: the read-only view of the studies that status, front, the progress line and the dashboard
read. It must never write: proven on a SQLite database opened read-only, and by the statements it sends."""

from __future__ import annotations

import inspect
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, event

from evomerge.run.progress import summary_text
from evomerge.store import Store, StudyNotFound
from evomerge.view import StudyView, effective_state

OBJ = [{"name": "acc", "direction": "maximize"}, {"name": "size", "direction": "minimize"}]
# (acc, size) per complete candidate: 1 and 3 are on the front, 2 is dominated by 1, 4 has no "size"
RESULTS = {1: (0.8, 2.0), 2: (0.7, 3.0), 3: (0.9, 5.0)}


def _fill(store: Store) -> None:
    store.create_study("s", "space: yaml", OBJ, budget=10)
    store.create_study("empty", "space: yaml", OBJ, budget=3)
    for n in range(1, 7):
        number = store.add_candidate("s", proposal_key=str(n), genome=[n / 10], recipe_json={"n": n},
                                     recipe_hash=f"h{n}")
        assert number == n
        if n in RESULTS:
            store.mark_running("s", n, worker=f"actor-{n % 2}")
            acc, size = RESULTS[n]
            store.complete_candidate("s", n, {"acc": acc, "size": size}, {"acc": [acc, 1.0]},
                                     {"materialize_s": 0.1 * n, "evaluate_s": 1.0, "fidelity": 1.0})
        elif n == 4:
            store.mark_running("s", n, worker="actor-0")
            store.complete_candidate("s", n, {"acc": 0.99}, None, {"materialize_s": 9.0})
        elif n == 5:
            store.mark_running("s", n, worker="actor-1")
            store.fail_candidate("s", n, "boom")
    store.add_scores("s", 3, {"held_out": 0.5})
    store.set_reference_point("s", [0.0, 10.0])


def _exercise(view: StudyView) -> dict:
    """Every public method of the view, with what it returned."""
    return {
        "studies": view.studies(),
        "study": view.study("s"),
        "state": view.state("s"),
        "objectives": view.objectives("s"),
        "counts": view.counts("s"),
        "candidates": view.candidates("s"),
        "complete": view.candidates("s", "complete"),
        "candidate": view.candidate("s", 3),
        "samples": view.sample_scores("s", 1),
        "front": view.front("s"),
        "best": view.best("s"),
        "hv": view.hypervolume("s"),
        "summary": view.summary("s"),
        "empty": view.summary("empty"),
        "timings": view.worker_timings("s"),
    }


def test_view_answers_from_the_store(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'v.db'}")
    _fill(store)
    got = _exercise(StudyView(store))
    assert [c.number for c in got["front"]] == [1, 3]
    assert got["front"][1].scores["held_out"] == 0.5  # report scores travel with the row
    assert got["best"] == {"acc": 0.9, "size": 2.0}  # candidate 4 lacks "size": not counted
    # HV against the stored (0, 10) in minimisation form (-0, 10): (0.8 x 8) + (0.9 - 0.8) x 5
    assert got["hv"] == pytest.approx(0.8 * 8 + 0.1 * 5)
    s = got["summary"]
    assert (s.done, s.counts["queued"], s.hypervolume, s.best) == (5, 1, got["hv"], got["best"])
    assert [o.name for o in s.objectives] == ["acc", "size"] and s.reference_point == [0.0, 10.0]
    assert summary_text(s) == "best acc 0.9, size 2 | HV 6.9 | failed 1"
    assert got["empty"].best == {} and got["empty"].hypervolume is None  # no reference point yet
    assert summary_text(got["empty"]) == "failed 0"
    assert got["samples"] == {"acc": [0.8, 1.0]}
    timings = {t.worker: t for t in got["timings"]}
    assert timings["actor-1"].candidates == 2  # 1 and 3
    assert timings["actor-1"].mean_s == pytest.approx({"materialize_s": 0.2, "evaluate_s": 1.0})
    assert timings["actor-0"].mean_s["materialize_s"] == pytest.approx((0.2 + 9.0) / 2)
    # the study is "running" with no lease held: a run that is gone
    assert got["state"] == "interrupted" and {r["study"]: r["state"] for r in got["studies"]}["s"] == "interrupted"
    with pytest.raises(StudyNotFound):
        StudyView(store).summary("nope")


def test_effective_state() -> None:
    now = datetime.now(UTC)
    assert effective_state("running", now + timedelta(seconds=30), now) == "running"
    assert effective_state("running", now - timedelta(seconds=1), now) == "interrupted"
    assert effective_state("running", None, now) == "interrupted"
    assert effective_state("done", None, now) == "done"


def test_view_never_writes(tmp_path: Path) -> None:
    path = tmp_path / "v.db"
    writer = Store(f"sqlite:///{path}")
    _fill(writer)

    def dump() -> list[str]:
        con = sqlite3.connect(path)
        try:
            return list(con.iterdump())
        finally:
            con.close()

    before = dump()
    # 1. The database opened read-only: any write the view attempted would raise.
    if "read_only" in inspect.signature(Store).parameters:
        ro = Store(f"sqlite:///{path}", read_only=True)
    else:
        ro = Store(f"sqlite:///file:{path}?mode=ro&uri=true")
    with pytest.raises(Exception, match="(?i)read.?only"):
        ro.set_study_status("s", "paused")  # the guard works
    _exercise(StudyView(ro))
    # 2. On a writable store, the view sends no statement that changes anything, and takes no write lock.
    statements: list[str] = []
    rw = Store(f"sqlite:///{path}")

    def record(conn, cursor, statement, *args) -> None:
        statements.append(" ".join(statement.split()[:2]).upper())

    event.listen(Engine, "before_cursor_execute", record)  # every engine: whatever the store keeps
    try:
        _exercise(StudyView(rw))
        kinds = {st.split()[0] for st in statements}
        assert kinds and kinds <= {"SELECT", "BEGIN", "PRAGMA"} and "BEGIN IMMEDIATE" not in statements, statements
        assert dump() == before
        rw.set_study_status("s", "paused")  # the listener sees writes
        assert "BEGIN IMMEDIATE" in statements and any(st.startswith("UPDATE") for st in statements)
    finally:
        event.remove(Engine, "before_cursor_execute", record)
