"""Fixtures shared by test files: a fresh PostgreSQL database per test.

PostgreSQL: ``$EVOMERGE_TEST_POSTGRES`` (a URL to any database of a server where the user may CREATE
DATABASE), else ``postgresql+psycopg://root@127.0.0.1:5432/postgres``, then ``postgres@``. The tests fail,
never skip, when no server answers: the store's PostgreSQL half is part of what they check.
"""

from __future__ import annotations

import os
import uuid

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url


def _pg_admin_url() -> sa.URL:
    candidates = (
        [os.environ["EVOMERGE_TEST_POSTGRES"]]
        if os.environ.get("EVOMERGE_TEST_POSTGRES")
        else [
            "postgresql+psycopg://root@127.0.0.1:5432/postgres",
            "postgresql+psycopg://postgres@127.0.0.1:5432/postgres",
        ]
    )
    errors = []
    for url in candidates:
        u = make_url(url)
        if u.drivername == "postgresql":
            u = u.set(drivername="postgresql+psycopg")
        eng = sa.create_engine(u)
        try:
            with eng.connect() as c:
                c.execute(sa.text("SELECT 1"))
            return u
        except sa.exc.OperationalError as e:
            errors.append(f"{u.render_as_string(hide_password=True)}: {str(e.orig).strip()}")
        finally:
            eng.dispose()
    pytest.fail("no PostgreSQL server for the store tests (set EVOMERGE_TEST_POSTGRES): " + "; ".join(errors))


@pytest.fixture(scope="session")
def pg_admin_url() -> sa.URL:
    return _pg_admin_url()


@pytest.fixture
def fresh_pg_url(pg_admin_url):
    """A URL to a new, empty PostgreSQL database, dropped after the test."""
    admin_url = pg_admin_url
    name = f"evomerge_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as c:
            c.execute(sa.text(f'CREATE DATABASE "{name}"'))
        yield admin_url.set(database=name).render_as_string(hide_password=False)
        with admin.connect() as c:
            c.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()




@pytest.fixture(scope="session")
def short_zoo(tmp_path_factory):
    """A short build of the demo zoo: weak models, the real build path, built once for the tests that need
    real models but not their scores. Shared: a test that alters a model copies it first."""
    from evomerge.zoo import build_zoo

    return build_zoo(tmp_path_factory.mktemp("zoo"), steps_scale=0.02, log=None, evaluate=False)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on one thread for a module of tiny models (more threads only contend on a small machine)."""
    import torch  # only for the modules that ask for it: the store's tests need no torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
