"""Tests of evomerge.store, run against SQLite (a temp file) and PostgreSQL (a fresh database per test).

PostgreSQL: ``$EVOMERGE_TEST_POSTGRES`` (a URL to any database of a server where the user may CREATE
DATABASE), else ``postgresql+psycopg://root@127.0.0.1:5432/postgres``, then ``postgres@``.
"""

from __future__ import annotations

import json
import math
import threading
import time

import numpy as np
import pytest
import sqlalchemy as sa

from evomerge.store import (
    CandidateNotFound,
    StorageOpenError,
    Store,
    StoreError,
    StoreReadOnly,
    StudyExists,
    StudyLocked,
    StudyNotFound,
    default_storage_url,
)
from evomerge.store.models import Base

TABLES = {"studies", "candidates", "scores", "sample_scores", "checkpoints", "hypervolume_points", "study_events",
          "alembic_version"}
OBJ2 = [{"name": "acc", "direction": "maximize"}, {"name": "size", "direction": "minimize"}]


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    """A storage URL to an empty database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'evomerge.db'}"
    return request.getfixturevalue("fresh_pg_url")


@pytest.fixture
def store(url):
    st = Store(url)
    yield st
    st.close()


def _study(store: Store, name: str = "s", objectives=OBJ2, budget: int | None = 20) -> str:
    store.create_study(name, "models: {}\n", objectives, budget)
    return name


def _add(store: Store, study: str, key: str, genome=(0.5, 0.5), recipe_hash: str | None = None, **kw) -> int:
    return store.add_candidate(
        study,
        key,
        list(genome),
        {"genome": list(genome)},
        recipe_hash or f"h-{key}",
        kw.pop("parents", []),
        kw.pop("generation", 0),
        **kw,
    )


# ------------------------------------------------------------------------------------ migrations


def test_migrations_create_schema_and_upgrade_is_idempotent(url):
    st = Store(url)
    try:
        head = st.db.head_revision()
        assert st.current_revision() == head == "0003" and st.revision_at_open is None
        insp = sa.inspect(st.db.engine)
        assert TABLES <= set(insp.get_table_names())
        # idempotent: a second upgrade and a second open change nothing
        assert st.db.upgrade() == (head, head)
        st2 = Store(url, auto_upgrade=False)
        assert st2.current_revision() == st2.revision_at_open == head
        st2.close()
        # the ORM models describe exactly the schema the migrations build
        from alembic.autogenerate import compare_metadata
        from alembic.runtime.migration import MigrationContext

        with st.db.engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(ctx, Base.metadata) == []
        if st.db.dialect == "sqlite":
            with st.db.engine.connect() as conn:
                assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
                assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 1000
    finally:
        st.close()


def test_schema_revision_checks(url):
    # an empty database is refused without auto_upgrade
    with pytest.raises(StoreError, match="storage upgrade"):
        Store(url, auto_upgrade=False)
    st = Store(url)
    st.create_study("kept", "x: 1", OBJ2, 5)
    # downgrade to nothing through alembic, then reopening upgrades again (data was dropped)
    from alembic import command

    cfg = st.db.alembic_config()
    with st.db.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "base")
    assert st.current_revision() is None
    st.close()
    st = Store(url)
    assert st.current_revision() == "0003" and st.list_studies() == []
    # a schema newer than this code is refused, even with auto_upgrade
    with st.db.engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '9999'"))
    st.close()
    with pytest.raises(StoreError, match="newer"):
        Store(url)


def test_bad_urls_and_default_url(tmp_path, monkeypatch):
    for bad in ["", "not a url", "nosuchdb://x/y", "mysql+nodriver://u@h/d"]:
        with pytest.raises(ValueError, match="storage URL"):
            Store(bad)
    with pytest.raises(ValueError, match="cannot open storage"):  # StorageOpenError is a ValueError
        Store(f"sqlite:///{tmp_path}/no/such/dir/x.db")
    monkeypatch.delenv("EVOMERGE_STORAGE", raising=False)
    monkeypatch.chdir(tmp_path)
    assert default_storage_url() == f"sqlite:///{tmp_path.resolve()}/evomerge.db"
    monkeypatch.setenv("EVOMERGE_STORAGE", "postgresql+psycopg://u@h/d")
    assert default_storage_url() == "postgresql+psycopg://u@h/d"


# --------------------------------------------------------------------------------------- studies


def test_study_create_get_list_counts(store):
    _study(store, "a", budget=10)
    _study(store, "b", objectives=[{"name": "loss", "direction": "min"}], budget=None)
    with pytest.raises(StudyExists):
        store.create_study("a", "", OBJ2, 1)
    with pytest.raises(ValueError, match="direction"):
        store.create_study("c", "", [{"name": "x", "direction": "up"}], 1)
    with pytest.raises(ValueError, match="reference point"):
        store.create_study("c", "", OBJ2, 1, reference_point=[1.0])
    with pytest.raises(StudyNotFound):
        store.get_study("nope")

    a = store.get_study("a")
    assert a.objectives == OBJ2 and a.status == "running" and a.budget == 10 and a.reference_point is None
    assert store.get_study("b").objectives == [{"name": "loss", "direction": "minimize"}]
    store.set_reference_point("a", [0.0, 100.0])
    assert store.get_study("a").reference_point == [0.0, 100.0]

    for i in range(5):
        _add(store, "a", f"k{i}")
    store.mark_running("a", 1, "w0")
    store.complete_candidate("a", 1, {"acc": 0.5, "size": 3}, attempt=True)
    store.mark_running("a", 2, "w1")
    store.fail_candidate("a", 2, "boom", attempt=True)
    store.mark_running("a", 3, "w0")
    assert store.count_attempt("a", 3) == 1  # its worker died on it
    store.requeue("a", 3)
    store.mark_running("a", 3, "w1")
    store.mark_running("a", 4, "w1")

    assert store.study_counts("a") == {
        "queued": 1,
        "running": 2,
        "complete": 1,
        "failed": 1,
        "total": 5,
        "attempts": 3,  # dispatches are not attempts: 3 and 4 run, no worker has reported on them yet
    }
    assert store.count_candidates("a") == 5 and store.count_candidates("b") == 0
    assert store.has_study("a") and not store.has_study("nope")
    assert store.free_study_name("c") == "c" and store.free_study_name("a") == "a-2"
    _study(store, "a-2")
    assert store.free_study_name("a") == "a-3"

    rows = {r["study"]: r for r in store.list_studies()}
    assert list(rows) == ["a", "b", "a-2"]
    ra = rows["a"]
    assert (ra["state"], ra["budget"], ra["complete"], ra["failed"], ra["running"], ra["queued"]) == (
        "running",
        10,
        1,
        1,
        2,
        1,
    )
    assert ra["attempts"] == 3 and ra["total"] == 5
    assert rows["b"]["attempts"] == 0 and rows["b"]["queued"] == 0 and rows["b"]["budget"] is None

    store.set_study_status("a", "paused")
    assert store.get_study("a").status == "paused"
    with pytest.raises(ValueError):
        store.set_study_status("a", "sleeping")


# ----------------------------------------------------------------------------------------- lease


def test_lease_exclusive_and_expired_takeover(url, store):
    _study(store)
    other = Store(url)  # a second driver process
    try:
        exp = store.acquire_lease("s", "driver-1", ttl_s=30)
        assert exp.tzinfo is not None
        assert store.acquire_lease("s", "driver-1", ttl_s=30) >= exp  # re-acquiring our own lease is fine
        with pytest.raises(StudyLocked, match=r"study s is being searched by driver-1 until 20\d\d-") as ei:
            other.acquire_lease("s", "driver-2", ttl_s=30)
        assert ei.value.owner == "driver-1"
        with pytest.raises(StudyLocked):
            other.renew_lease("s", "driver-2", ttl_s=30)
        assert other.release_lease("s", "driver-2") is False
        store.renew_lease("s", "driver-1", ttl_s=0.05)
        time.sleep(0.1)
        # expired: the second driver takes over, and the first learns it lost the lease
        other.acquire_lease("s", "driver-2", ttl_s=30)
        assert store.get_study("s").lease_owner == "driver-2"
        with pytest.raises(StudyLocked, match="driver-2"):
            store.renew_lease("s", "driver-1", ttl_s=30)
        assert other.release_lease("s", "driver-2") is True
        store.acquire_lease("s", "driver-1", ttl_s=30)
        # force: take a live lease from a driver known to be dead, compare-and-swap on its id
        with pytest.raises(StudyLocked):
            other.acquire_lease("s", "driver-3", ttl_s=30, force="driver-9")
        other.acquire_lease("s", "driver-3", ttl_s=30, force="driver-1")
        with pytest.raises(StudyLocked, match="driver-3"):
            store.acquire_lease("s", "driver-1", ttl_s=30)
        store.acquire_lease("s", "driver-1", ttl_s=30, force=True)
        assert store.get_study("s").lease_owner == "driver-1"
        with pytest.raises(StudyNotFound):
            store.acquire_lease("nope", "driver-1", ttl_s=30)
    finally:
        other.close()


def test_lease_race_has_one_winner(url, store):
    _study(store)
    stores = [Store(url) for _ in range(4)]
    wins, locked = [], []
    barrier = threading.Barrier(len(stores))

    def go(i: int) -> None:
        barrier.wait()
        try:
            stores[i].acquire_lease("s", f"d{i}", ttl_s=30)
            wins.append(i)
        except StudyLocked:
            locked.append(i)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for s in stores:
        s.close()
    assert len(wins) == 1 and len(locked) == len(stores) - 1
    assert store.get_study("s").lease_owner == f"d{wins[0]}"


# ------------------------------------------------------------------------------------ candidates


def test_add_and_complete_are_idempotent(store):
    _study(store)
    assert _add(store, "s", "g0-0") == 1
    assert (
        _add(store, "s", "g0-1", genome=(0.1, 0.9), parents=[1], generation=1, operator="sbx", niche=3) == 2
    )
    assert _add(store, "s", "g0-0") == 1  # same proposal key: same candidate, nothing added
    assert [c.number for c in store.candidates("s")] == [1, 2]
    c2 = store.get_candidate("s", 2)
    assert (c2.genome, c2.parents, c2.generation, c2.operator, c2.niche, c2.state, c2.attempts) == (
        [0.1, 0.9],
        [1],
        1,
        "sbx",
        3,
        "queued",
        0,
    )
    assert json.loads(c2.recipe_json) == {"genome": [0.1, 0.9]} and c2.recipe_hash == "h-g0-1"
    # numbers are per study
    _study(store, "t")
    assert _add(store, "t", "g0-0") == 1
    with pytest.raises(ValueError, match="genome"):
        _add(store, "s", "bad", genome=(float("nan"),))

    assert store.mark_running("s", 1, "w0") is True
    assert store.heartbeat("s", [1, 2]) == 1
    samples = {"acc": [1.0, 0.0, 1.0, 1 / 3]}
    assert (
        store.complete_candidate("s", 1, {"acc": 0.75, "size": 2.0}, samples, {"evaluate_s": 1.5}, attempt=True)
        == "complete"
    )
    # a retried task delivers the same (or another) result again: no-op
    assert store.complete_candidate("s", 1, {"acc": 0.1, "size": 9.0}, {"acc": [0.0]}, attempt=True) is None
    assert store.fail_candidate("s", 1, "late failure", attempt=True) is False
    assert store.count_attempt("s", 1) == 1  # a finished candidate is not charged again
    assert store.mark_running("s", 1, "w1") is False
    assert store.requeue("s", 1) is False
    c1 = store.get_candidate("s", 1)
    assert c1.state == "complete" and c1.scores == {"acc": 0.75, "size": 2.0} and c1.attempts == 1
    assert c1.timings == {"evaluate_s": 1.5} and c1.worker == "w0" and c1.finished is not None
    assert store.sample_scores("s", 1) == samples  # float64: bit-exact
    assert store.sample_scores("s", 2) == {}
    assert [c.number for c in store.pending_candidates("s")] == [2]
    assert [c.number for c in store.candidates("s", state="complete")] == [1]
    with pytest.raises(CandidateNotFound):
        store.mark_running("s", 99, "w0")
    with pytest.raises(StudyNotFound):
        _add(store, "nope", "k")


def test_non_finite_scores_fail_the_candidate(store):
    _study(store)
    for i in range(4):
        _add(store, "s", f"k{i}")
        store.mark_running("s", i + 1, "w")
    assert store.complete_candidate("s", 1, {"acc": float("nan"), "size": 1.0}) == "failed"
    assert store.complete_candidate("s", 2, {"acc": 0.5, "size": float("inf")}) == "failed"
    assert (
        store.complete_candidate("s", 3, {"acc": 0.5, "size": 1.0}, {"acc": [1.0, float("nan")]}) == "failed"
    )
    assert store.complete_candidate("s", 4, {"acc": None, "size": 1.0}) == "failed"
    for n, word in [(1, "acc"), (2, "size"), (3, "acc"), (4, "acc")]:
        c = store.get_candidate("s", n)
        assert c.state == "failed" and word in c.error and "finite" in c.error and c.scores == {}
    assert store.sample_scores("s", 3) == {}
    assert store.front("s") == []
    # a failed candidate may be retried
    assert store.requeue("s", 1) is True
    assert store.get_candidate("s", 1).state == "queued"
    store.mark_running("s", 1, "w")
    assert store.complete_candidate("s", 1, {"acc": 0.5, "size": 1.0}) == "complete"


def test_attempts_count_evaluations_that_reached_a_worker(store):
    _study(store)
    _add(store, "s", "k")
    store.mark_running("s", 1, "w0")
    assert store.get_candidate("s", 1).attempts == 0  # dispatched, no worker has answered yet
    assert store.count_attempt("s", 1) == 1  # worker died on it
    store.requeue("s", 1)
    store.mark_running("s", 1, "w1")
    store.requeue("s", 1)  # Ctrl-C or a closed pool before the worker answered: not charged
    store.mark_running("s", 1, "w2")
    store.mark_running("s", 1, "w2")  # re-dispatched while still marked running
    assert store.get_candidate("s", 1).attempts == 1
    assert store.fail_candidate("s", 1, "Traceback ...\nRuntimeError: oom", {"materialize_s": 0.5},
                                attempt=True) is True
    c = store.get_candidate("s", 1)
    assert (c.attempts, c.state, c.worker, c.timings) == (2, "failed", "w2", {"materialize_s": 0.5})
    assert "oom" in c.error
    assert store.list_studies()[0]["attempts"] == 2


def test_find_by_hash(store):
    _study(store)
    _add(store, "s", "a", recipe_hash="same")
    _add(store, "s", "b", recipe_hash="same")
    assert store.find_by_hash("s", "same") is None  # nothing complete yet
    store.mark_running("s", 2, "w")
    store.complete_candidate("s", 2, {"acc": 0.4, "size": 1.0}, {"acc": [0.4]})
    hit = store.find_by_hash("s", "same")
    assert hit is not None and hit.number == 2 and hit.scores == {"acc": 0.4, "size": 1.0}
    assert store.find_by_hash("s", "other") is None


# ----------------------------------------------------------------------------------- checkpoints


def test_checkpoints_round_trip(store):
    _study(store)
    assert store.latest_checkpoint("s") is None
    state = {
        "pop": [[0.1, 0.2], [0.3, 0.4]],
        "rng": {"state": 2**64 + 1, "inc": 7},
        "best": float("-inf"),
        "sigma": 0.1 + 0.2,
        "arr": np.arange(3.0),
        "name": "nsga2",
    }
    store.save_checkpoint("s", 1, "nsga2", state)
    step, algo, got = store.latest_checkpoint("s")
    assert (step, algo) == (1, "nsga2")
    assert got["pop"] == state["pop"] and got["rng"] == state["rng"] and got["sigma"] == 0.1 + 0.2
    assert got["best"] == -math.inf and got["arr"] == [0.0, 1.0, 2.0]
    for k in range(2, 7):
        store.save_checkpoint("s", k, "nsga2", {"k": k}, keep=3)
    store.save_checkpoint("s", 6, "nsga2", {"k": "six"}, keep=3)  # same step: replaced
    assert store.latest_checkpoint("s") == (6, "nsga2", {"k": "six"})
    with store.db.engine.connect() as c:
        assert c.execute(sa.text("SELECT step FROM checkpoints ORDER BY step")).scalars().all() == [4, 5, 6]

    with pytest.raises(ValueError, match="JSON"):
        store.save_checkpoint("s", 9, "x", {"obj": object()})


def test_events_round_trip_newest_last(url, store):
    _study(store)
    _study(store, "other")
    assert store.study_events("s") == []
    store.add_study_event("s", "node_lost", "node 10.0.0.2:1 (ab) lost; 1 node(s) left")
    store.add_study_event("other", "node_lost", "not this study's")
    store.add_study_event("s", "workers_back", "all 4 workers are running again")
    got = store.study_events("s")
    assert [(e.kind, e.message) for e in got] == [
        ("node_lost", "node 10.0.0.2:1 (ab) lost; 1 node(s) left"),
        ("workers_back", "all 4 workers are running again"),
    ]
    assert got[0].time.tzinfo is not None and got[0].time <= got[1].time
    assert [e.kind for e in store.study_events("s", limit=1)] == ["workers_back"]
    with pytest.raises(ValueError, match="event kind"):
        store.add_study_event("s", "", "x")
    with pytest.raises(StudyNotFound):
        store.add_study_event("nope", "node_lost", "x")
    with Store(url, read_only=True) as ro:
        assert ro.study_events("s") == got
        with pytest.raises(StoreReadOnly):
            ro.add_study_event("s", "node_lost", "x")


def test_upgrade_from_0002_keeps_studies_and_adds_events(url):
    from alembic import command

    st = Store(url)
    _study(st)
    st.save_checkpoint("s", 1, "nsga2", {"k": 1})
    cfg = st.db.alembic_config()
    with st.db.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0002")
    assert "study_events" not in sa.inspect(st.db.engine).get_table_names()
    st.close()
    with pytest.raises(StoreError, match="storage upgrade"):
        Store(url, read_only=True)
    with Store(url) as st:
        assert st.revision_at_open == "0002" and st.current_revision() == "0003"
        assert st.latest_checkpoint("s") == (1, "nsga2", {"k": 1}) and st.study_events("s") == []
        st.add_study_event("s", "node_lost", "x")
        assert [e.kind for e in st.study_events("s")] == ["node_lost"]


# ----------------------------------------------------------------------------------------- front


def _brute_front(F: np.ndarray) -> np.ndarray:
    n = len(F)
    return np.array(
        [not any(np.all(F[j] <= F[i]) and np.any(F[j] < F[i]) for j in range(n)) for i in range(n)],
        dtype=bool,
    )


def test_front_uses_directions(store):
    _study(store, "s", objectives=OBJ2 + [{"name": "loss", "direction": "minimize"}])
    rng = np.random.default_rng(1)
    vals = rng.integers(0, 4, size=(25, 3)).astype(float)
    vals[7] = vals[3]  # an exact duplicate: both or neither on the front
    for i, v in enumerate(vals):
        n = _add(store, "s", f"k{i}")
        store.mark_running("s", n, "w")
        store.complete_candidate("s", n, {"acc": v[0], "size": v[1], "loss": v[2]})
    # an incomplete score set and a failed candidate never reach the front
    n = _add(store, "s", "partial")
    store.mark_running("s", n, "w")
    store.complete_candidate("s", n, {"acc": 99.0})
    n = _add(store, "s", "failed")
    store.mark_running("s", n, "w")
    store.complete_candidate("s", n, {"acc": float("nan"), "size": 0.0, "loss": 0.0})

    expected = {i + 1 for i in np.flatnonzero(_brute_front(vals * np.array([-1.0, 1.0, 1.0])))}
    got = store.front("s")
    assert {c.number for c in got} == expected
    assert [c.number for c in got] == sorted(expected)
    assert (4 in expected) == (8 in expected)


def test_front_two_objectives_by_hand(store):
    _study(store)
    points = {1: (0.9, 10.0), 2: (0.8, 5.0), 3: (0.7, 6.0), 4: (0.9, 12.0), 5: (0.5, 1.0)}
    for n, (acc, size) in points.items():
        _add(store, "s", f"k{n}")
        store.mark_running("s", n, "w")
        store.complete_candidate("s", n, {"acc": acc, "size": size})
    assert [c.number for c in store.front("s")] == [1, 2, 5]


def test_list_studies_is_json_friendly(store):
    _study(store)
    row = store.list_studies()[0]
    json.dumps({k: v for k, v in row.items() if k not in {"created", "updated", "lease_expires"}})


# ------------------------------------------------------------------------------------- read-only


def _raw_write(st: Store) -> None:
    with st.db.engine.begin() as conn:
        conn.execute(sa.text("UPDATE studies SET status = 'done'"))


def test_read_only_reads_and_refuses_writes(url, store):
    _study(store)
    _add(store, "s", "k0")
    store.mark_running("s", 1, "w")
    store.complete_candidate("s", 1, {"acc": 0.5, "size": 1.0}, {"acc": [0.5, 0.5]})
    store.save_checkpoint("s", 1, "nsga2", {"k": 1})
    ro = Store(url, read_only=True)
    try:
        assert ro.read_only and "read_only=True" in repr(ro)
        assert ro.get_study("s").objectives == OBJ2 and ro.has_study("s")
        assert [c.number for c in ro.front("s")] == [1] and ro.sample_scores("s", 1) == {"acc": [0.5, 0.5]}
        assert ro.latest_checkpoint("s") == (1, "nsga2", {"k": 1}) and ro.study_counts("s")["complete"] == 1
        writes = [
            lambda: ro.create_study("t", "", OBJ2, 1),
            lambda: _add(ro, "s", "k1"),
            lambda: ro.mark_running("s", 1, "w"),
            lambda: ro.complete_candidate("s", 1, {"acc": 0.1, "size": 1.0}),
            lambda: ro.fail_candidate("s", 1, "x"),
            lambda: ro.requeue("s", 1),
            lambda: ro.heartbeat("s", [1]),
            lambda: ro.add_scores("s", 1, {"acc": 0.9}),
            lambda: ro.save_checkpoint("s", 2, "nsga2", {}),
            lambda: ro.acquire_lease("s", "d", ttl_s=30),
            lambda: ro.release_lease("s", "d"),
            lambda: ro.set_study_status("s", "done"),
            lambda: ro.set_reference_point("s", [0.0, 1.0]),
            lambda: ro.db.upgrade(),
        ]
        for write in writes:
            with pytest.raises(StoreReadOnly, match="read-only"):
                write()
        # the database itself refuses writes too (mode=ro file / READ ONLY transactions)
        with pytest.raises(sa.exc.DBAPIError, match="(?i)read.?only"):
            _raw_write(ro)
        # a reader follows the writer's progress
        _add(store, "s", "k1")
        assert ro.count_candidates("s") == 2
    finally:
        ro.close()
    assert store.get_study("s").status == "running" and store.count_candidates("s") == 2
    store.close()  # with no writer left (SQLite has merged its WAL away) a reader still opens
    with Store(url, read_only=True) as ro2:
        assert [c.number for c in ro2.candidates("s")] == [1, 2]


def test_read_only_never_creates_or_upgrades(url, tmp_path):
    if url.startswith("sqlite"):
        missing = tmp_path / "missing.db"
        with pytest.raises(StorageOpenError, match="no database file"):
            Store(f"sqlite:///{missing}", read_only=True)
        assert not missing.exists()
    eng = sa.create_engine(url)
    try:
        with eng.connect():  # an existing but empty database (SQLite creates the file here)
            pass
        with pytest.raises(StorageOpenError, match="no evomerge schema"):
            Store(url, read_only=True)
        assert sa.inspect(eng).get_table_names() == []  # left empty
    finally:
        eng.dispose()


def test_migration_head_read_from_the_files_is_alembics(tmp_path):
    # opening a store at head reads the head from the migration files, without importing Alembic
    from alembic.script import ScriptDirectory

    from evomerge.store.engine import migration_head

    with Store(f"sqlite:///{tmp_path / 'h.db'}") as st:
        assert migration_head() == ScriptDirectory.from_config(st.db.alembic_config()).get_current_head()


def test_an_estimate_is_no_result(store):
    """A candidate whose scores are anchor estimates is never on the front, in the best scores, the
    hypervolume or its series, however good the estimate, in the store's and the view's answers alike."""
    from evomerge.run.hvseries import HypervolumeSeries
    from evomerge.view import StudyView

    _study(store, "s")
    store.set_reference_point("s", [0.0, 10.0])
    for key, acc, size, tim in [("a", 0.5, 5.0, None), ("b", 0.8, 8.0, {"fidelity": 1.0}),
                                ("e", 0.9, 1.0, {"estimated": 1.0, "pruned": 1.0, "fidelity": 0.1})]:
        n = _add(store, "s", key)
        store.mark_running("s", n, "w")
        store.complete_candidate("s", n, {"acc": acc, "size": size}, None, tim)
    view = StudyView(store)
    assert [c.number for c in store.front("s")] == [1, 2] == [c.number for c in view.front("s")]
    assert [c.estimated for c in store.candidates("s")] == [False, False, True]
    assert store.best_scores("s") == {"acc": (0.5, 0.8), "size": (5.0, 8.0)}
    assert view.best("s") == {"acc": 0.8, "size": 5.0}
    hv = 0.5 * 5.0 + (0.8 - 0.5) * 2.0  # (acc, 10 - size) boxes of a and b only
    assert view.hypervolume("s") == pytest.approx(hv)
    assert [row[-1] for row in store.study_table("s")[0]] == [False, False, True]
    series = HypervolumeSeries(store, "s", ["acc", "size"], ["maximize", "minimize"])
    series.update()
    assert [p["value"] for p in store.hypervolume_series("s")][-1] == pytest.approx(hv)
