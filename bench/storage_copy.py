"""`evomerge storage copy` on a study of realistic size: SQLite -> PostgreSQL -> SQLite, timed, every row compared.

Builds a study of N candidates (two objectives, 200 per-example scores each, lineage, timings, three
checkpoints) in a SQLite file, copies it to a new PostgreSQL database (created here, dropped after) and
back to another SQLite file, and compares every row of the three (ids mapped to study and candidate
number). Prints rows and seconds per copy, then ``RESULT <json>``.

Usage: ``python bench/storage_copy.py [--candidates 2000] [--examples 200]`` (PostgreSQL as in the tests:
``$EVOMERGE_TEST_POSTGRES`` or root@127.0.0.1:5432).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
import uuid
from datetime import datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402  (after the path: the checkout's evomerge, not an installed one)
import sqlalchemy as sa  # noqa: E402

from evomerge.store import Store  # noqa: E402
from evomerge.store.copy import StudyRows, copy_studies, write_study  # noqa: E402
from evomerge.store.models import Base  # noqa: E402


def synthetic(n: int, examples: int) -> StudyRows:
    rng = np.random.default_rng(0)
    t0 = datetime(2026, 1, 1)
    rows = StudyRows({"space_yaml": "name: bench\n" * 40, "objectives": [{"name": "a", "direction": "maximize"},
                      {"name": "b", "direction": "minimize"}], "reference_point": [0.0, 1.0], "status": "paused",
                      "budget": n, "created": t0, "updated": t0, "lease_owner": None, "lease_expires": None})
    for i in range(1, n + 1):
        g = rng.random(96).tolist()  # a 32-block genome of weight and density per source
        rows.candidates.append({
            "number": i, "proposal_key": str(i), "genome": g, "recipe_json": json.dumps({"genes": g}),
            "recipe_hash": hashlib.sha256(str(g).encode()).hexdigest(), "parents": [max(1, i - 7), max(1, i - 3)],
            "operator": "dare_ties", "generation": i // 64, "niche": None, "state": "complete", "attempts": 1,
            "error": None, "worker": f"node{i % 8}:{1000 + i % 8}:cuda", "told_step": None,
            "timings": {"materialize_s": 0.4, "evaluate_s": 31.5}, "heartbeat": t0 + timedelta(seconds=i),
            "created": t0 + timedelta(seconds=i), "started": t0 + timedelta(seconds=i),
            "finished": t0 + timedelta(seconds=i + 30)})
        for obj in ("a", "b"):
            s = (rng.random(examples) < 0.5).astype("<f8")
            rows.scores.append({"number": i, "objective": obj, "value": float(s.mean())})
            rows.samples.append({"number": i, "objective": obj, "count": examples, "data": s.tobytes()})
    for step in (n - 2, n - 1, n):
        rows.checkpoints.append({"step": step, "algorithm": "cmaes", "state": json.dumps({"mean": [0.5] * 96}),
                                 "created": t0})
    return rows


def digest(url: str) -> tuple[int, str]:
    """Rows, and a hash of every row with ids replaced by what they stand for."""
    eng = sa.create_engine(url)
    h, count = hashlib.sha256(), 0
    try:
        with eng.connect() as c:
            num = dict(c.execute(sa.text("SELECT id, number FROM candidates")).all())
            for table in Base.metadata.sorted_tables:  # typed columns: JSON and timestamps read alike
                rows = [dict(r._mapping) for r in c.execute(sa.select(table))]
                for r in rows:
                    r.pop("id")
                    r.pop("study_id", None)
                    if "candidate_id" in r:
                        r["candidate_id"] = num[r["candidate_id"]]
                    if isinstance(r.get("data"), memoryview):
                        r["data"] = bytes(r["data"])
                for r in sorted(rows, key=repr):
                    h.update(repr(sorted(r.items())).encode())
                count += len(rows)
    finally:
        eng.dispose()
    return count, h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--candidates", type=int, default=2000)
    ap.add_argument("--examples", type=int, default=200)
    a = ap.parse_args()
    admin = sa.make_url(os.environ.get("EVOMERGE_TEST_POSTGRES") or "postgresql+psycopg://root@127.0.0.1:5432/postgres")
    admin = admin.set(drivername="postgresql+psycopg")
    name = f"evomerge_bench_{uuid.uuid4().hex[:8]}"
    eng = sa.create_engine(admin, isolation_level="AUTOCOMMIT")
    with eng.connect() as c:
        c.execute(sa.text(f'CREATE DATABASE "{name}"'))
    pg = admin.set(database=name).render_as_string(hide_password=False)
    try:
        with tempfile.TemporaryDirectory() as d:
            src, back = f"sqlite:///{d}/src.db", f"sqlite:///{d}/back.db"
            with Store(src) as st, st.db.session(write=True) as s:
                write_study(s.connection(), synthetic(a.candidates, a.examples), "bench")
            rows, want = digest(src)
            t = time.perf_counter()
            copy_studies(src, pg)
            to_pg = time.perf_counter() - t
            t = time.perf_counter()
            copy_studies(pg, back)
            to_sqlite = time.perf_counter() - t
            same = digest(pg) == digest(back) == (rows, want)
            size = Path(f"{d}/src.db").stat().st_size
    finally:
        with eng.connect() as c:
            c.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        eng.dispose()
    print(f"study of {a.candidates} candidates x {a.examples} examples x 2 objectives: {rows} rows, "
          f"SQLite file {size / 2**20:.1f} MiB")
    print(f"sqlite -> postgresql  {to_pg:6.2f} s  ({rows / to_pg:,.0f} rows/s)")
    print(f"postgresql -> sqlite  {to_sqlite:6.2f} s  ({rows / to_sqlite:,.0f} rows/s)")
    print(f"every row equal after the round trip: {same}")
    print("RESULT " + json.dumps({"candidates": a.candidates, "examples": a.examples, "rows": rows,
                                  "sqlite_bytes": size, "sqlite_to_postgresql_s": round(to_pg, 3),
                                  "postgresql_to_sqlite_s": round(to_sqlite, 3), "round_trip_equal": same}))


if __name__ == "__main__":
    main()
