"""The hypervolume series: stored by the run as candidates finish, against the study's fixed reference
point, rebuilt for what finished before it existed, and carried into old databases by migration 0002."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from test_driver import FakeWorker, _space, _study

from evomerge.run import InProcessPool, StudyRun
from evomerge.run.hvseries import HypervolumeSeries
from evomerge.store import Store, StoreError
from evomerge.view import StudyView


@pytest.fixture
def fake_worker():
    FakeWorker.calls, FakeWorker.deaths = [], 0
    yield FakeWorker
    FakeWorker.calls, FakeWorker.deaths = [], 0


def test_a_run_stores_the_series_and_a_resume_rebuilds_nothing_twice(tmp_path: Path, fake_worker) -> None:
    space = _space(tmp_path, algorithm="nsga2", budget=8)
    store = _study(tmp_path, space)
    StudyRun(space, store, "s", show_progress=False, pool=lambda cfg: InProcessPool(FakeWorker, 2)).run()
    view = StudyView(store)
    series = view.hypervolume_series("s")
    done = view.summary("s").done
    assert [p["evaluations"] for p in series] == list(range(1, done + 1))
    values = [p["value"] for p in series]
    assert values == sorted(values) and values[-1] == pytest.approx(view.hypervolume("s")) and values[-1] > 0
    assert all(p["recorded"] is not None for p in series)
    # every point is the hypervolume of the complete candidates finished by then
    rows = sorted(view.candidates("s", "complete"), key=lambda c: (c.finished, c.number))
    st = view.study("s")
    from evomerge import front as frontlib  # the same math the view uses, on a prefix

    for p in series:
        F = frontlib.to_minimization([[c.scores["a"], c.scores["b"]] for c in rows[: p["complete"]]],
                                     ["maximize", "maximize"])
        assert p["value"] == pytest.approx(frontlib.hypervolume(F, st.reference_point) if len(F) else 0.0)
    # a second recorder (a resumed run) adds nothing; with the points gone it writes the same ones again
    HypervolumeSeries(store, "s", ["a", "b"], ["maximize", "maximize"]).update()
    assert view.hypervolume_series("s") == series
    with store.db.session(write=True) as s:
        s.execute(sa.text("DELETE FROM hypervolume_points"))
    HypervolumeSeries(store, "s", ["a", "b"], ["maximize", "maximize"]).update()
    assert [(p["evaluations"], p["value"]) for p in view.hypervolume_series("s")] == \
        [(p["evaluations"], p["value"]) for p in series]


def test_an_old_database_upgrades_with_its_studies(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    st = Store(url)
    st.create_study("kept", "x: 1", [{"name": "a", "direction": "maximize"}], 3)
    from alembic import command  # to build a database as evomerge 0001 left it

    cfg = st.db.alembic_config()
    with st.db.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0001")
    st.close()
    with pytest.raises(StoreError, match="storage upgrade"):
        Store(url, read_only=True)
    r = subprocess.run([sys.executable, "-c", "from evomerge.cli import main; main()", "storage", "upgrade",
                        "--storage", url], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "from 0001 to 0003" in r.stdout, r.stderr
    st = Store(url, read_only=True)
    assert st.current_revision() == "0003" and [s["study"] for s in st.list_studies()] == ["kept"]
    assert st.hypervolume_series("kept") == []
    st.close()
