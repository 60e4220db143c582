"""A search on a Ray cluster of several nodes on 127.0.0.1 (each node its own `ray start`), the driver
joining by address, PostgreSQL as the store: the workers spread over the nodes, a whole node killed with
no spare capacity costs only the candidates it had in flight, and the pool grows back when a node joins.
The end-to-end cases with the demo models (the driver killed and resumed, `ray job submit`) are
`bench/multinode.py`'s, which `test_driver_killed_and_ray_job_scenarios` runs.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from loopback_cluster import LoopbackCluster

from evomerge.store import Store

ROOT = Path(__file__).resolve().parents[1]

DRIVER = """
import sys
from pathlib import Path
from rich.console import Console
from test_driver import _space, _study
from loopback_cluster import SleepActor
from evomerge.run import StudyRun
from evomerge.run.pool import RayPool
from evomerge.space import dump_space
from evomerge.store import Store

tmp, url, address, budget = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
space = _space(tmp, algorithm="nsga2", budget=budget)
store = Store(url)
store.create_study("s", dump_space(space), [{"name": "a", "direction": "maximize"},
                                            {"name": "b", "direction": "maximize"}], budget=budget)
print("created", flush=True)
StudyRun(space, store, "s", show_progress=False, console=Console(file=sys.stdout, width=400),
         pool=lambda cfg: RayPool(cfg, 4, address, actor=SleepActor)).run()
print("finished", flush=True)
"""


def _complete(store: Store) -> int:
    try:
        return store.study_counts("s")["complete"]
    except Exception:  # noqa: BLE001 - the driver has not created the study yet
        return 0


@pytest.mark.slow
def test_node_lost_with_no_spare_capacity_then_back(tmp_path: Path, fresh_pg_url: str) -> None:
    budget = 160
    with LoopbackCluster() as cluster:
        path = f"{ROOT}:{ROOT / 'tests'}"
        cluster.env.update(PYTHONPATH=path, EVOMERGE_FAKE_S="0.4")
        cluster.worker_env.update(PYTHONPATH=path, EVOMERGE_FAKE_S="0.4")
        cluster.start_head(cpus=0)  # no worker on the head: the two worker nodes are all the capacity
        cluster.add_node(2)
        cluster.add_node(2)
        out = tmp_path / "driver.out"
        with open(out, "w") as f:
            p = subprocess.Popen([sys.executable, "-c", DRIVER, str(tmp_path), fresh_pg_url, cluster.address,
                                  str(budget)], env=cluster.env, cwd=tmp_path, stdout=f, stderr=subprocess.STDOUT)
        store = Store(fresh_pg_url)
        try:
            t0 = time.monotonic()
            while _complete(store) < 12:
                assert p.poll() is None, out.read_text()[-3000:]
                assert time.monotonic() - t0 < 180, "the search did not start"
                time.sleep(0.2)
            cluster.kill_node(2)
            at_kill = _complete(store)
            while _complete(store) < at_kill + 30:  # the search goes on with the two workers left
                assert p.poll() is None, out.read_text()[-3000:]
                assert time.monotonic() - t0 < 240, "the search stalled after the node was lost"
                time.sleep(0.2)
            cluster.add_node(2)
            assert p.wait(timeout=240) == 0, out.read_text()[-3000:]
        finally:
            if p.poll() is None:
                p.kill()
        text = out.read_text()
    cands = store.candidates("s")
    counts = store.study_counts("s")
    assert store.get_study("s").status == "done" and counts["complete"] == budget and counts["failed"] == 0
    # nothing evaluated is lost, and only what the lost node had in flight (2 workers) ran twice
    assert counts["attempts"] <= budget + 2 and all(1 <= c.attempts <= 2 for c in cands)
    nodes = [int(c.timings["node"]) for c in cands]
    assert {1, 2} <= set(nodes), "the workers did not spread over both nodes"
    assert nodes.count(2) <= at_kill + 2  # nothing ran on the lost node after it died
    assert nodes.count(3) > 0, "the pool did not grow back onto the node that joined"
    lines = text.splitlines()
    assert any(ln.startswith("node 127.0.0.1:") and " lost; " in ln for ln in lines), text[-3000:]
    # Ray names the cause as the node's only when it learns of the node's death first; when the killed
    # worker processes' dropped connections reach it first (a loaded machine), it is a killed process. Either
    # way each death is one line naming the candidate and the retry
    assert any(re.search(r"died \((node lost( or unreachable)?|process or its node gone|process killed or crashed)\) "
                         r"while evaluating #\d+; retrying, attempt 2/3$", ln) for ln in lines), text[-3000:]
    assert "Traceback" not in text
    # the run kept what it printed: the node lost, and all workers back once the new node joined (in either
    # order: Ray names a node dead only after missing its heartbeats, the replacements may be up by then)
    events = store.study_events("s")
    kinds = [e.kind for e in events]
    assert "node_lost" in kinds and "workers_back" in kinds, events
    lost = next(e.message for e in events if e.kind == "node_lost")
    assert lost in text  # the stored message is the printed line
    status = subprocess.run([sys.executable, "-c", "from evomerge.cli import main; main()", "status", "--storage",
                             fresh_pg_url], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert status.returncode == 0 and "cluster events:" in status.stdout and " lost; " in status.stdout, \
        status.stdout + status.stderr


@pytest.mark.slow
def test_driver_killed_and_ray_job_scenarios(tmp_path: Path) -> None:
    """bench/multinode.py's driver and Ray Job cases, small: the driver killed with kill -9 and resumed
    from another process ends as an uninterrupted run; `ray job submit -- evomerge search` runs, and the
    job, killed, is continued by `evomerge resume`. Nothing evaluated is lost."""
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "multinode.py"), "--quick", "--cases",
                        "driver_killed,ray_job", "--work", str(tmp_path)], cwd=tmp_path, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    by = {c["case"]: c for c in json.loads(line[len("RESULT "):])["cases"]}
    for c in by.values():
        assert c["complete"] == c["budget"] and c["lost"] == 0, c
        assert c["attempts"] - c["complete"] <= c["in_flight_bound"], c
    assert by["driver_killed"]["same_as_uninterrupted"]
    assert by["ray_job"]["job_state"] == "FAILED" and by["ray_job"]["killed"] >= 1
