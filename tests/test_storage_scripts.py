"""storage/: the PostgreSQL setup (owner and SELECT-only roles), and backup and restore with pg_dump and
pg_restore, run against the local PostgreSQL server."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from test_storage_copy import CLI, _fill, dump

from evomerge.store import Store, StoreReadOnly

STORAGE = Path(__file__).resolve().parents[1] / "storage"


def _libpq(url: sa.URL) -> str:
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture
def databases(pg_admin_url: sa.URL) -> Iterator[list[str]]:
    """Names for new databases (and roles) of this test; whatever was created under them is dropped."""
    names: list[str] = []
    yield names
    admin = sa.create_engine(pg_admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as c:
            for n in names:
                c.execute(sa.text(f'DROP DATABASE IF EXISTS "{n}" WITH (FORCE)'))
            for n in names:
                if c.execute(sa.text("SELECT 1 FROM pg_roles WHERE rolname = :n"), {"n": n}).first():
                    c.execute(sa.text(f'DROP OWNED BY "{n}"'))
                    c.execute(sa.text(f'DROP ROLE "{n}"'))
    finally:
        admin.dispose()


def _name(names: list[str], what: str) -> str:
    names.append(f"evomerge_t_{what}_{uuid.uuid4().hex[:8]}")
    return names[-1]


def _createdb(admin_url: sa.URL, name: str) -> str:
    eng = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with eng.connect() as c:
        c.execute(sa.text(f'CREATE DATABASE "{name}"'))
    eng.dispose()
    return admin_url.set(database=name).render_as_string(hide_password=False)


def _sh(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", *args], capture_output=True, text=True, timeout=120)


def test_backup_and_restore_give_back_every_row(tmp_path: Path, pg_admin_url: sa.URL, databases: list[str]) -> None:
    src = _createdb(pg_admin_url, _name(databases, "src"))
    dst = _createdb(pg_admin_url, _name(databases, "dst"))
    _fill(src)
    file = tmp_path / "evomerge.dump"
    r = _sh(str(STORAGE / "backup.sh"), src, str(file))  # evomerge's own URL form
    assert r.returncode == 0, r.stderr
    assert file.stat().st_size > 0 and not list(tmp_path.glob("evomerge.dump.*"))
    r = _sh(str(STORAGE / "restore.sh"), str(file), dst)
    assert r.returncode == 0, r.stderr
    assert dump(dst) == dump(src)  # a restore keeps even the lease: it is the same database, moved
    with Store(dst) as st:  # opens at the schema head, and a restored study goes on
        assert st.current_revision() == st.db.head_revision()
        assert st.add_candidate("beta", "k-new", [0.5], {"w": 1}, "h-new") == 7
    # a database that already holds a store is refused, and left as it was
    before = dump(dst)
    r = _sh(str(STORAGE / "restore.sh"), str(file), dst)
    assert r.returncode == 2 and "already holds evomerge tables" in r.stderr
    assert dump(dst) == before


def test_backup_and_restore_refuse_bad_arguments(tmp_path: Path) -> None:
    for script, args in [("backup.sh", ["sqlite:///x.db", str(tmp_path / "f")]), ("backup.sh", ["only-one"]),
                         ("restore.sh", [str(tmp_path / "missing.dump"), "postgresql://u@h/d"])]:
        r = _sh(str(STORAGE / script), *args)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, (script, args, r.stderr)


def test_setup_sql_makes_an_owner_and_a_select_only_reader(pg_admin_url: sa.URL, databases: list[str]) -> None:
    db, owner, reader = _name(databases, "db"), _name(databases, "own"), _name(databases, "ro")
    r = subprocess.run(
        ["psql", "--no-psqlrc", "--quiet", "--dbname", _libpq(pg_admin_url), "-v", f"db={db}", "-v", f"owner={owner}",
         "-v", "owner_password=pw1", "-v", f"reader={reader}", "-v", "reader_password=pw2",
         "-f", str(STORAGE / "setup.sql")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    as_owner = pg_admin_url.set(username=owner, password="pw1", database=db)
    as_reader = pg_admin_url.set(username=reader, password="pw2", database=db)
    r = subprocess.run([*CLI, "storage", "upgrade", "--storage", as_owner.render_as_string(hide_password=False)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "upgraded from empty" in r.stdout, r.stderr
    _fill(as_owner.render_as_string(hide_password=False))
    with Store(as_reader, read_only=True) as st:
        assert [s["study"] for s in st.list_studies()] == ["alpha", "beta"]
        assert st.sample_scores("alpha", 1)
        with pytest.raises(StoreReadOnly):
            st.set_study_status("alpha", "done")
    # the server itself refuses the reader's writes, whatever client it uses
    eng = sa.create_engine(as_reader)
    try:
        with pytest.raises(sa.exc.ProgrammingError, match="permission denied"), eng.begin() as c:
            c.execute(sa.text("UPDATE studies SET status = 'done'"))
        with pytest.raises(sa.exc.ProgrammingError, match="permission denied"), eng.begin() as c:
            c.execute(sa.text("CREATE TABLE evil (x int)"))
    finally:
        eng.dispose()
