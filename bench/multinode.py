"""Multi-node scenario on one machine: a Ray head and two worker nodes on 127.0.0.1 (each its own
`ray start`, own ports, own temp folder, Ray's token auth), `evomerge` drivers joining with
`--ray-address`, PostgreSQL as the store (a database of its own, dropped at the end), the demo zoo's models
(`--quick`: a short build of the zoo, in the work folder).

Cases, one row each (candidates, attempts, wall time):
  spread         4 workers on 2 nodes of 2 CPUs each (the head has none): all four evaluate, the search ends.
  node_lost      kill -9 of a whole worker node (its ray start, raylet, workers) mid-search, no spare
                 capacity: its candidates are retried on the survivors; a node joins later and the pool
                 grows back; the driver names the lost node in one line.
  driver_killed  kill -9 of the driver mid-search; `evomerge resume` from another process joins the same
                 cluster and finishes with the same candidates and scores as an uninterrupted run.
  ray_job        `ray job submit -- evomerge search ...` runs; a job killed mid-search (FAILED) is
                 continued with `evomerge resume`.
In every case nothing evaluated is lost, and attempts - candidates <= what was in flight when killed.

    python bench/multinode.py [--quick]        ends with RESULT {json}
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from loopback_cluster import LoopbackCluster  # noqa: E402 - the shared test helper, found through tests/

from evomerge.store import Store  # noqa: E402

PG_ADMIN = os.environ.get("EVOMERGE_TEST_POSTGRES", "postgresql+psycopg://root@127.0.0.1:5432/postgres")
CLI = [sys.executable, "-m", "evomerge.cli"]
WORKERS = 4

SPACE = """
base_model: {base}
models: [{arith}, {script}]
genome: {{method: task_arithmetic, layer_groups: 2}}
objectives:
  - {{name: arith, task: demo_arith_search, metric: "exact_match,none", limit: {limit}}}
  - {{name: script, task: demo_script_search, metric: "exact_match,none", limit: {limit}}}
algorithm: {{name: {algorithm}{settings}}}
evaluation: {{batch_size: 16, task_paths: [{tasks}]}}
budget: {budget}
seed: 0
"""


# The models: the demo zoo's, or (``--quick``) a short build of it, whose weak models exercise the same
# paths (the full build trains for minutes; the scenarios test the cluster, not the scores).
MODELS = {m: f"zoo://{m}" for m in ("base", "arith", "script")}


def write_space(d: Path, name: str, budget: int, algorithm: str = "nsga2", limit: int = 16) -> Path:
    settings = ", settings: {pop_size: 8}" if algorithm == "nsga2" else ""
    p = d / f"{name}.yaml"
    p.write_text(SPACE.format(algorithm=algorithm, settings=settings, budget=budget, limit=limit,
                              tasks=ROOT / "search_spaces" / "demo_tasks", **MODELS))
    return p


class Db:
    def __init__(self) -> None:
        self.admin = sa.create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
        self.name = f"evomerge_mn_{uuid.uuid4().hex[:10]}"
        with self.admin.connect() as c:
            c.execute(sa.text(f'CREATE DATABASE "{self.name}"'))
        self.url = sa.make_url(PG_ADMIN).set(database=self.name).render_as_string(hide_password=False)
        self.store = Store(self.url)

    def counts(self, study: str) -> dict[str, int]:
        try:
            return self.store.study_counts(study)
        except Exception:  # noqa: BLE001 - the driver has not created the study (or the tables) yet
            return {}

    def results(self, study: str) -> list[tuple]:
        return [(c.number, c.recipe_hash, json.dumps(c.scores, sort_keys=True)) for c in self.store.candidates(study)]

    def close(self) -> None:
        self.store.close()
        with self.admin.connect() as c:
            c.execute(sa.text(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)'))
        self.admin.dispose()


def wait_for(pred, what: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    t0 = time.monotonic()
    while not pred():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: the driver ended first (exit {proc.returncode})")
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"{what}: not within {timeout} s")
        time.sleep(0.3)


def row(case: str, db: Db, study: str, budget: int, t0: float, in_flight_bound: int, **extra) -> dict:
    c = db.counts(study)
    complete = c.get("complete", 0)
    r = {"case": case, "budget": budget, "complete": complete, "failed": c.get("failed", 0),
         "attempts": c.get("attempts", 0), "lost": budget - complete - c.get("failed", 0),
         "in_flight_bound": in_flight_bound, "wall_s": round(time.monotonic() - t0, 1), **extra}
    print(json.dumps(r), flush=True)
    return r


class Scenario:
    def __init__(self, quick: bool, work: Path) -> None:
        self.quick = quick
        self.work = work
        self.cluster = LoopbackCluster()
        for env in (self.cluster.env, self.cluster.worker_env):
            env.update(PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", EVOMERGE_THREADS="1")
        self.db = Db()

    def start(self) -> None:
        self.dash = self.cluster.start_head(cpus=0, dashboard=True)
        self.cluster.add_node(2)
        self.cluster.add_node(2)

    def driver(self, args: list[str], log: str) -> subprocess.Popen:
        with open(self.work / log, "w") as f:
            return subprocess.Popen([*CLI, *args, "--storage", self.db.url, "--ray-address", self.cluster.address,
                                     "--no-progress"], env=self.cluster.env, cwd=self.work, stdout=f,
                                    stderr=subprocess.STDOUT)

    def search(self, study: str, space: Path, log: str) -> subprocess.Popen:
        return self.driver(["search", "--space", str(space), "--study", study, "--workers", str(WORKERS)], log)

    def done(self, p: subprocess.Popen, log: str, timeout: float = 600) -> None:
        rc = p.wait(timeout=timeout)
        if rc != 0:
            raise RuntimeError(f"{log} exited {rc}: {(self.work / log).read_text()[-2000:]}")

    def spread(self) -> dict:
        budget = 12 if self.quick else 24
        t0 = time.monotonic()
        p = self.search("spread", write_space(self.work, "spread", budget), "spread.log")
        placed: dict[int, int] = {}
        while p.poll() is None and sum(placed.values()) < WORKERS:
            now = self.cluster.actors_per_node("MergeWorkerActor")  # Ray's actor table, per node
            if sum(now.values()) > sum(placed.values()):  # the most seen at once (none once it ends)
                placed = now
            time.sleep(1)
        self.done(p, "spread.log")
        workers = len({c.worker for c in self.db.store.candidates("spread")})
        return row("spread", self.db, "spread", budget, t0, 0, workers=workers,
                   actors_per_node=sorted(placed.values()))

    def node_lost(self) -> dict:
        # the full run leaves enough work after the rejoin (slower evaluations, more of them) for the
        # workers on the new node to load the models and take part
        budget, limit = (32, 16) if self.quick else (96, 64)
        t0 = time.monotonic()
        p = self.search("lost", write_space(self.work, "lost", budget, limit=limit), "lost.log")
        wait_for(lambda: self.db.counts("lost").get("complete", 0) >= 6, "node_lost start", 400, p)
        killed = self.cluster.kill_node(2)
        at_kill = self.db.counts("lost").get("complete", 0)
        wait_for(lambda: self.db.counts("lost").get("complete", 0) >= at_kill + 4, "after the kill", 300, p)
        rejoin = time.monotonic()
        self.cluster.add_node(2)  # capacity comes back: the pending workers start on it
        self.done(p, "lost.log")
        text = (self.work / "lost.log").read_text()
        return row("node_lost", self.db, "lost", budget, t0, 2, killed_processes=killed,
                   node_named=any(ln.startswith("node 127.0.0.1:") and " lost; " in ln for ln in text.splitlines()),
                   grew_back="workers are running again" in text, rejoin_s=round(time.monotonic() - rejoin, 1))

    def driver_killed(self) -> dict:
        budget = 8 if self.quick else 32
        space = write_space(self.work, "resume", budget, algorithm="random")
        ref = self.search("reference", space, "reference.log")
        self.done(ref, "reference.log")
        t0 = time.monotonic()
        p = self.search("resumed", space, "killed.log")
        wait_for(lambda: self.db.counts("resumed").get("complete", 0) >= budget // 3, "driver start", 400, p)
        p.send_signal(signal.SIGKILL)
        p.wait()
        r = self.driver(["resume", "resumed", "--workers", str(WORKERS)], "resume.log")
        self.done(r, "resume.log")
        same = [x[1:] for x in self.db.results("reference")] == [x[1:] for x in self.db.results("resumed")]
        return row("driver_killed", self.db, "resumed", budget, t0, WORKERS, same_as_uninterrupted=same)

    def _job(self, entry: list[str], wait: bool) -> tuple[str, subprocess.CompletedProcess]:
        job_id = f"evomerge_{uuid.uuid4().hex[:8]}"
        args = [str(Path(sys.executable).with_name("ray")), "job", "submit", "--address",
                f"http://127.0.0.1:{self.dash}", "--submission-id", job_id, *([] if wait else ["--no-wait"]),
                "--", *entry]
        r = subprocess.run(args, env=self.cluster.env, cwd=self.work, capture_output=True, text=True, timeout=900)
        return job_id, r

    def job_status(self, job_id: str) -> str:
        r = subprocess.run([str(Path(sys.executable).with_name("ray")), "job", "status", "--address",
                            f"http://127.0.0.1:{self.dash}", job_id], env=self.cluster.env, capture_output=True,
                           text=True, timeout=120)
        text = r.stdout + r.stderr  # Ray's CLI logs its answer to either: "Job 'ID' failed"
        m = re.search(rf"Job '{job_id}' (?:is currently |has )?(\w+)", text)
        return m.group(1).upper() if m else "?"

    def ray_job(self) -> dict:
        budget = 8 if self.quick else 32
        space = write_space(self.work, "job", budget)
        entry = [*CLI, "search", "--space", str(space), "--study", "job", "--workers", str(WORKERS),
                 "--storage", self.db.url, "--ray-address", self.cluster.address, "--no-progress"]
        t0 = time.monotonic()
        job_id, r = self._job(entry, wait=False)
        if r.returncode != 0:
            raise RuntimeError(f"ray job submit: {r.stdout[-1000:]} {r.stderr[-1000:]}")
        wait_for(lambda: self.db.counts("job").get("complete", 0) >= budget // 3, "job start", 400)
        # kill -9 of the job's driver: the entrypoint process, somewhere under the head node
        victims = [q for q in psutil.process_iter(["cmdline"]) if "--study" in (q.info["cmdline"] or [])
                   and "job" in (q.info["cmdline"] or []) and "search" in (q.info["cmdline"] or [])
                   and "submit" not in (q.info["cmdline"] or [])]
        for q in victims:
            q.kill()
        states: list[str] = []
        wait_for(lambda: states.append(self.job_status(job_id)) or states[-1] in ("FAILED", "STOPPED"),
                 "the killed job's state", 120)
        state = states[-1]
        r2 = self.driver(["resume", "job", "--workers", str(WORKERS)], "job_resume.log")
        self.done(r2, "job_resume.log")
        return row("ray_job", self.db, "job", budget, t0, WORKERS, job_state=state, killed=len(victims))

    def close(self) -> None:
        self.cluster.close()
        self.db.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller budgets (what the test runs)")
    ap.add_argument("--work", type=Path, default=None, help="folder for spaces and driver logs")
    ap.add_argument("--cases", default="spread,node_lost,driver_killed,ray_job")
    a = ap.parse_args()
    work = a.work or Path.cwd() / "multinode_work"
    work.mkdir(parents=True, exist_ok=True)
    if a.quick:
        from evomerge.zoo import build_zoo  # only the quick run builds (a short zoo of its own)

        short = build_zoo(work / "zoo", steps_scale=0.02, log=None, evaluate=False)
        MODELS.update({m: str(short / m) for m in MODELS})
    sc = Scenario(a.quick, work)
    t0 = time.monotonic()
    try:
        sc.start()
        setup_s = round(time.monotonic() - t0, 1)
        cases = [getattr(sc, name)() for name in a.cases.split(",")]
    finally:
        sc.close()
    print("RESULT " + json.dumps({"setup_s": setup_s, "cases": cases, "nodes": "head (0 CPU) + 2 x 2 CPU",
                                  "workers": WORKERS, "store": "postgresql"}))


if __name__ == "__main__":
    main()
