"""Fault injection: the driver killed with SIGKILL between any two SQL statements it sends (at start-up,
during the search, during the held-out report scoring, while it finishes, and during `storage upgrade`),
and workers dying during evaluation and report scoring, on SQLite and PostgreSQL.

Each killed run is resumed by a new process, which takes the dead run's lease over. Nothing is lost: the
study ends with exactly the candidates and scores (report scores included) of an uninterrupted run, and
the only evaluations run twice are those in flight when the driver died.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from fault_driver import drive, evaluations, final_state, kill_and_resume, kill_points, new_study, study_space_yaml

from evomerge.store import Store


@pytest.fixture(scope="module")
def space_yaml(tmp_path_factory) -> str:
    return study_space_yaml(tmp_path_factory.mktemp("faults"))


class Backend:
    """A fresh database per run, holding the study before any driver touched it."""

    def __init__(self, kind: str, tmp: Path, pg_admin: sa.URL | None, space_yaml: str) -> None:
        self.kind, self.tmp, self.pg_admin, self.space_yaml = kind, tmp, pg_admin, space_yaml
        self.made: list[str] = []
        if kind == "sqlite":
            self.template = tmp / "template.db"
            new_study(f"sqlite:///{self.template}", space_yaml)

    def fresh(self, with_study: bool = True) -> str:
        """A new database holding the study, or (``with_study=False``) nothing at all."""
        if self.kind == "sqlite":
            path = self.tmp / f"{uuid.uuid4().hex[:8]}.db"
            if with_study:
                shutil.copy(self.template, path)
            return f"sqlite:///{path}"
        name = f"evomerge_fault_{uuid.uuid4().hex[:10]}"
        self._admin(f'CREATE DATABASE "{name}"')
        self.made.append(name)
        url = self.pg_admin.set(database=name).render_as_string(hide_password=False)
        if with_study:
            new_study(url, self.space_yaml)
        return url

    def _admin(self, sql: str) -> None:
        eng = sa.create_engine(self.pg_admin, isolation_level="AUTOCOMMIT")
        try:
            with eng.connect() as c:
                c.execute(sa.text(sql))
        finally:
            eng.dispose()

    def close(self) -> None:
        for name in self.made:
            self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request, tmp_path: Path, space_yaml: str):
    admin = request.getfixturevalue("pg_admin_url") if request.param == "postgresql" else None
    b = Backend(request.param, tmp_path, admin, space_yaml)
    yield b
    b.close()


@pytest.mark.slow
def test_driver_killed_at_any_phase_resumes_to_the_uninterrupted_result(backend: Backend, tmp_path: Path) -> None:
    ref_url, ref_log = backend.fresh(), tmp_path / "ref.log"
    r = drive("run", ref_url, "s", "--log", str(ref_log))
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads(r.stdout.splitlines()[-1])
    reference = final_state(ref_url)
    assert reference[0] == ("done", None) and len(reference) == 11
    assert all(state == "complete" for _, _, state, _ in reference[1:])
    assert sum(1 for *_, scores in reference[1:] if "held" in scores) >= 1  # the front got report scores
    ref_evals = evaluations(ref_log)
    assert set(ref_evals.values()) == {1}
    assert set(info["phases"]) >= {"open", "start-up", "search", "report", "finish"}

    phases: set[str] = set()
    for n in kill_points(info["phases"], per_phase=2):
        k = kill_and_resume(backend.fresh(), n, tmp_path)
        assert k["killed"] and k["resumed"], (n, k["phase"], k["stderr"])
        assert k["final"] == reference, (n, k["phase"])
        # Evaluated again only if in flight when the driver died: a result it never stored.
        assert set(k["twice_search"]) <= set(k["running"]), k
        assert set(k["twice_report"]) <= set(k["unscored"]), k
        assert k["evaluated_twice"] <= 2 and k["most_evaluations"] <= 2, k
        phases.add(k["phase"])
    assert phases >= {"start-up", "search", "report", "finish"}


@pytest.mark.slow
def test_a_worker_dying_in_evaluation_or_report_scoring_is_retried(backend: Backend, tmp_path: Path) -> None:
    ref_url = backend.fresh()
    assert drive("run", ref_url, "s", "--log", str(tmp_path / "ref.log")).returncode == 0
    reference = final_state(ref_url)
    for die_at in (3, 9, 12):  # the 11th evaluation and later are the report's
        url, log = backend.fresh(), tmp_path / f"die{die_at}.log"
        r = drive("run", url, "s", "--log", str(log), "--die-at", str(die_at))
        assert r.returncode == 0, r.stderr[-3000:]
        assert final_state(url) == reference
        lines = log.read_text().splitlines()
        kind, number = lines[die_at - 1].split()
        assert lines.count(f"{kind} {number}") == 2  # the evaluation it died in ran again, on its replacement
        store = Store(url, read_only=True)
        try:
            attempts = {c.number: c.attempts for c in store.candidates("s")}
        finally:
            store.close()
        said = [line for line in r.stderr.splitlines() if "died" in line]
        if kind == "search":
            assert attempts[int(number)] == 2 and sum(attempts.values()) == 11
            assert said == [f"worker 1 died (RuntimeError: worker lost) while evaluating #{number}; "
                            "retrying, attempt 2/3"], r.stderr
        else:  # report scoring charges no search attempt
            assert set(attempts.values()) == {1}
            assert len(said) == 1 and said[0].endswith(
                f"died (RuntimeError: worker lost) while scoring #{number} on held-out held; retrying, attempt 2/3")


def _schema(url: str) -> dict:
    eng = sa.create_engine(url)
    try:
        insp = sa.inspect(eng)
        tables = {t: sorted((c["name"], str(c["type"])) for c in insp.get_columns(t))
                  for t in insp.get_table_names()}
        with eng.connect() as c:
            version = c.execute(sa.text("select version_num from alembic_version")).scalar_one()
        return {"tables": tables, "version": version,
                "indexes": {t: sorted(i["name"] for i in insp.get_indexes(t)) for t in tables}}
    finally:
        eng.dispose()


@pytest.mark.slow
def test_storage_upgrade_killed_at_any_statement_leaves_an_upgradable_database(backend: Backend) -> None:
    """A schema upgrade is one transaction: killed anywhere, the database holds the old schema (or the
    new one, once committed), and the next upgrade brings it to exactly the schema of a clean one."""
    def empty() -> str:
        return backend.fresh(with_study=False)

    clean = empty()
    r = drive("upgrade", clean)
    assert r.returncode == 0, r.stderr[-2000:]
    want = _schema(clean)
    statements = json.loads(r.stdout.splitlines()[-1])["phases"]["upgrade"]
    step = 3 if backend.kind == "sqlite" else 7
    for n in range(statements[0], statements[1] + 1, step):
        url = empty()
        killed = drive("upgrade", url, "--kill-at", str(n))
        assert killed.returncode == -9, (n, killed.stderr[-2000:])
        again = drive("upgrade", url)
        assert again.returncode == 0, (n, again.stderr[-2000:])
        assert _schema(url) == want, n


def test_ray_death_reports_are_left_to_the_pool(capsys) -> None:
    """Ray prints every worker death as a dozen '(raylet)' lines; the pool's one line says it all."""
    from ray._private import worker as ray_worker

    from evomerge.run.pool import RAY_DEATH_REPORTS, quiet_worker_death_reports

    original = ray_worker.print_to_stdstream
    try:
        quiet_worker_death_reports()
        quiet_worker_death_reports()  # once is enough: not wrapped twice
        printer = ray_worker.print_to_stdstream
        assert getattr(printer, "evomerge_quiet", False)
        # wrapped once, whether or not an earlier pool in this process had wrapped it already
        assert (printer is original) == bool(getattr(original, "evomerge_quiet", False))
        death = f"{RAY_DEATH_REPORTS[0]} a task by an unexpected system error. RayTask ID: ffff\\nWorker ID: 12"
        lost = f"The node with node id: cb7d and address: 127.0.0.1 {RAY_DEATH_REPORTS[1]} from it. This can happen"
        for line in (death, lost):
            printer({"lines": [line], "pid": "raylet", "is_err": False}, ignore_prefix=False)
        printer({"lines": ["Task was killed due to the node running low on memory."], "pid": "raylet",
                 "is_err": False}, ignore_prefix=False)
        out = capsys.readouterr().out
        assert not any(r in out for r in RAY_DEATH_REPORTS) and "low on memory" in out
    finally:
        ray_worker.print_to_stdstream = original
