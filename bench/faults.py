"""Faults by phase: the driver killed with SIGKILL before its Nth SQL statement, for N spread over every
phase of a run (start-up, search, held-out report scoring, finish), and `storage upgrade` killed at its
statements; then workers dying at each evaluation of a run, search and report scoring alike.

A killed run *survives* when a new process resumes it to exactly the uninterrupted run's candidates and
scores (report scores included), with no evaluation run again but those in flight at the kill. A worker
death survives when the run ends with the same result and the evaluation it died in ran again.

    python bench/faults.py [--per-phase 8] [--postgres URL_OF_ANY_DB_ON_A_SERVER]

Ends with `RESULT {"backends": {name: {"phases": {phase: {"injected", "survived", "evaluated_twice",
"max_twice_per_fault"}}, "upgrade": {"injected", "survived"}, "worker_deaths": {"injected", "survived"}}}}`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import uuid
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import sqlalchemy as sa  # noqa: E402
from fault_driver import (  # noqa: E402
    drive,
    evaluations,
    final_state,
    kill_and_resume,
    kill_points,
    new_study,
    study_space_yaml,
)


def _urls(kind: str, work: Path, admin: sa.URL | None, space_yaml: str) -> tuple[Callable[[bool], str], list[str]]:
    made: list[str] = []
    template = work / "template.db"
    if kind == "sqlite":
        new_study(f"sqlite:///{template}", space_yaml)

    def fresh(with_study: bool = True) -> str:
        if kind == "sqlite":
            path = work / f"{uuid.uuid4().hex[:8]}.db"
            if with_study:
                shutil.copy(template, path)
            return f"sqlite:///{path}"
        name = f"evomerge_bench_{uuid.uuid4().hex[:10]}"
        eng = sa.create_engine(admin, isolation_level="AUTOCOMMIT")
        with eng.connect() as c:
            c.execute(sa.text(f'CREATE DATABASE "{name}"'))
        eng.dispose()
        made.append(name)
        url = admin.set(database=name).render_as_string(hide_password=False)
        if with_study:
            new_study(url, space_yaml)
        return url

    return fresh, made


def _backend(kind: str, work: Path, admin: sa.URL | None, space_yaml: str, per_phase: int) -> dict:
    fresh, made = _urls(kind, work, admin, space_yaml)
    try:
        ref_url = fresh(True)
        r = drive("run", ref_url, "s", "--log", str(work / "ref.log"))
        assert r.returncode == 0, r.stderr[-2000:]
        info = json.loads(r.stdout.splitlines()[-1])
        phases_at = info["phases"]  # first and last statement of each phase (finish comes twice: spans overlap)
        reference = final_state(ref_url)
        runs = len(evaluations(work / "ref.log"))

        table: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(
            ("injected", "survived", "evaluated_twice", "max_twice_per_fault"), 0))
        for n in kill_points(phases_at, per_phase):
            k = kill_and_resume(fresh(True), n, work)
            row = table[k["phase"] or "?"]
            row["injected"] += 1
            ok = (k["killed"] and k["resumed"] and k["final"] == reference
                  and set(k["twice_search"]) <= set(k["running"]) and set(k["twice_report"]) <= set(k["unscored"]))
            row["survived"] += int(ok)
            row["evaluated_twice"] += k["evaluated_twice"]
            row["max_twice_per_fault"] = max(row["max_twice_per_fault"], k["evaluated_twice"])
            print(f"{kind:<10} kill at statement {n:>4} ({k['phase']:<8}): "
                  f"{'survived' if ok else 'LOST'}, evaluated twice {k['evaluated_twice']}", flush=True)

        clean = fresh(False)
        up = drive("upgrade", clean)
        first, last = json.loads(up.stdout.splitlines()[-1])["phases"]["upgrade"]
        upgrade = {"injected": 0, "survived": 0}
        for n in range(first, last + 1, max(1, (last - first + 1) // max(per_phase * 3, 1))):
            url = fresh(False)
            killed = drive("upgrade", url, "--kill-at", str(n))
            again = drive("upgrade", url)
            upgrade["injected"] += 1
            upgrade["survived"] += int(killed.returncode == -9 and again.returncode == 0)

        deaths = {"injected": 0, "survived": 0, "search": 0, "report": 0}
        for die_at in range(1, runs + 1):
            url, log = fresh(True), work / f"die{die_at}.log"
            r = drive("run", url, "s", "--log", str(log), "--die-at", str(die_at))
            lines = log.read_text().splitlines()
            deaths["injected"] += 1
            deaths[lines[die_at - 1].split()[0]] += 1
            deaths["survived"] += int(r.returncode == 0 and final_state(url) == reference
                                      and lines.count(lines[die_at - 1]) == 2)
        return {"phases": dict(table), "upgrade": upgrade, "worker_deaths": deaths,
                "statements_per_run": info["statements"]}
    finally:
        if made:
            eng = sa.create_engine(admin, isolation_level="AUTOCOMMIT")
            with eng.connect() as c:
                for name in made:
                    c.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            eng.dispose()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-phase", type=int, default=8, help="kill points per phase (0: every statement)")
    ap.add_argument("--postgres", help="URL of any database on a PostgreSQL server where you may CREATE DATABASE")
    args = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        space_yaml = study_space_yaml(work)
        backends = [("sqlite", None)]
        if args.postgres:
            admin = sa.make_url(args.postgres)
            backends.append(("postgresql", admin.set(drivername="postgresql+psycopg")))
        for kind, admin in backends:
            (work / kind).mkdir()
            results[kind] = _backend(kind, work / kind, admin, space_yaml, args.per_phase)

    print(f"\n{'backend':<11}{'phase':<10}{'injected':>9}{'survived':>9}{'eval. twice':>12}{'max/fault':>10}")
    for kind, res in results.items():
        for phase, row in res["phases"].items():
            print(f"{kind:<11}{phase:<10}{row['injected']:>9}{row['survived']:>9}{row['evaluated_twice']:>12}"
                  f"{row['max_twice_per_fault']:>10}")
        print(f"{kind:<11}{'upgrade':<10}{res['upgrade']['injected']:>9}{res['upgrade']['survived']:>9}")
        d = res["worker_deaths"]
        print(f"{kind:<11}{'w. deaths':<10}{d['injected']:>9}{d['survived']:>9}   "
              f"({d['search']} in search, {d['report']} in report scoring)")
    print("RESULT " + json.dumps({"backends": results}))


if __name__ == "__main__":
    main()
