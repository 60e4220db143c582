"""Worker faults and the local Ray cluster: a worker that cannot start stops the search in one line and
charges nothing, a retried candidate gets one line, and the cluster `search` starts is its own and
listens on 127.0.0.1 only."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest
from rich.console import Console
from test_driver import FakeWorker, _space, _study

from evomerge.run import InProcessPool, StudyRun
from evomerge.run.pool import LOOPBACK, RayPool, WorkerStartError, short_reason
from evomerge.workers import WorkerConfig

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "search_spaces" / "demo_tasks"


@pytest.fixture
def fake_worker():
    FakeWorker.calls, FakeWorker.deaths = [], 0
    yield FakeWorker
    FakeWorker.calls, FakeWorker.deaths = [], 0


def _cannot_start() -> FakeWorker:
    raise FileNotFoundError("no model folder at /gone/expert\nsecond line of the message")


def test_a_worker_that_cannot_start_says_why_in_one_line() -> None:
    with pytest.raises(WorkerStartError) as e:
        InProcessPool(_cannot_start, workers=2)
    assert str(e.value) == "a worker could not start: FileNotFoundError: no model folder at /gone/expert"


def test_start_failure_pauses_the_study_charges_nothing_and_resumes(tmp_path: Path, fake_worker) -> None:
    space = _space(tmp_path, budget=6)
    store = _study(tmp_path, space)
    starts = iter([FakeWorker, FakeWorker])  # two workers start; the replacement of a dead one cannot

    def factory() -> FakeWorker:
        make = next(starts, _cannot_start)
        return make()

    fake_worker.deaths = 1
    run = StudyRun(space, store, "s", show_progress=False, pool=lambda cfg: InProcessPool(factory, 2))
    with pytest.raises(WorkerStartError, match="FileNotFoundError: no model folder"):
        run.run()
    st = store.get_study("s")
    assert st.status == "paused" and st.lease_owner is None
    cands = store.candidates("s")
    assert cands and {c.state for c in cands} <= {"queued", "complete"}
    # charged: the evaluation the dead worker had started; the task waiting its turn reached no worker
    assert sum(c.attempts for c in cands if c.state == "queued") == 1
    assert len(fake_worker.calls) == sum(1 for c in cands if c.state == "complete")

    StudyRun(space, store, "s", show_progress=False, pool=lambda cfg: InProcessPool(FakeWorker, 2)).run()
    counts = store.study_counts("s")
    assert store.get_study("s").status == "done" and counts["complete"] == 6 and counts["failed"] == 0


def test_a_start_failure_before_any_dispatch_charges_no_candidate(tmp_path: Path, fake_worker) -> None:
    space = _space(tmp_path, budget=4)
    store = _study(tmp_path, space)
    with pytest.raises(WorkerStartError):
        StudyRun(space, store, "s", show_progress=False, pool=lambda cfg: InProcessPool(_cannot_start, 2)).run()
    assert store.study_counts("s")["attempts"] == 0 and not fake_worker.calls
    assert store.get_study("s").status == "paused" and store.get_study("s").lease_owner is None


def test_a_retried_candidate_gets_one_line(tmp_path: Path, fake_worker) -> None:
    space = _space(tmp_path, budget=4)
    store = _study(tmp_path, space)
    buf = io.StringIO()
    fake_worker.deaths = 1
    StudyRun(space, store, "s", show_progress=False, console=Console(file=buf, width=300),
             pool=lambda cfg: InProcessPool(FakeWorker, 1)).run()
    lines = [ln for ln in buf.getvalue().splitlines() if "died" in ln]
    assert len(lines) == 1, buf.getvalue()
    assert re.fullmatch(r"worker 0 died \(RuntimeError: worker lost\) while evaluating #\d+; retrying, "
                        r"attempt 2/3", lines[0])
    assert store.get_study("s").status == "done"


class _RayDeath(Exception):
    """Ray's text for an actor whose process was killed (abridged from Ray 2.60)."""


RAY_KILLED = (
    "The actor died unexpectedly before finishing this task.\n\tclass_name: A\n\tpid: 28482\n"
    "The actor is dead because its worker process has died. Worker exit type: SYSTEM_ERROR Worker exit "
    "detail: Worker unexpectedly exits with a connection error code 2. End of file. Some common causes "
    "include: (1) the process was killed by the OOM killer due to high memory usage, (2) ray stop --force "
    "was called, or (3) the worker crashed unexpectedly due to SIGSEGV or another unexpected error."
)


def test_short_reason_reads_the_exit_detail_not_ray_list_of_causes() -> None:
    assert short_reason(_RayDeath(RAY_KILLED)) == "process killed or crashed"
    oom = RAY_KILLED.replace("Worker unexpectedly exits with a connection error code 2",
                             "Task was killed due to the node running low on memory")
    assert short_reason(_RayDeath(oom)) == "out of memory"
    # a lost node can end an actor before Ray knows why: no exit detail, only its first line
    assert short_reason(_RayDeath(RAY_KILLED.split("\n")[0])) == "process or its node gone"


def test_a_lost_node_and_the_workers_back_are_notes_of_their_kind() -> None:
    """The RayPool's news, without a cluster: what it reads of Ray's node table, and what it says."""
    pool = object.__new__(RayPool)  # only the node bookkeeping; no actor is started
    node = {"NodeID": "3cb8d965" + "0" * 48, "Alive": True, "NodeManagerAddress": "10.0.0.2", "NodeManagerPort": 4000}
    head = {"NodeID": "f" * 56, "Alive": True}
    nodes = [head, node]
    pool.ray = type("FakeRay", (), {"nodes": staticmethod(lambda: nodes)})()
    pool._notes, pool._lost_nodes = [], set()
    pool._name_lost_nodes()
    assert pool.notes() == []
    node["Alive"] = False
    pool._name_lost_nodes()
    pool._name_lost_nodes()  # named once
    assert pool.notes() == [("node_lost", "node 10.0.0.2:4000 (3cb8d965) lost; 1 node(s) left; its workers are "
                                          "replaced where the cluster has room, the search goes on meanwhile")]
    assert pool.notes() == []


def _ray_temp_with_a_foreign_cluster() -> Path:
    """A short Ray temp folder (Unix socket paths are limited) naming a cluster that is not ours."""
    tmp = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))
    (tmp / "ray").mkdir()
    (tmp / "ray" / "ray_current_cluster").write_text("203.0.113.9:6379\n")
    return tmp


def _listening(pids: list[int]) -> set[str]:
    out = set()
    for pid in pids:
        try:
            conns = psutil.Process(pid).net_connections(kind="inet")
        except psutil.NoSuchProcess:
            continue
        out |= {c.laddr.ip for c in conns if c.status == psutil.CONN_LISTEN}
    return out


@pytest.mark.slow
def test_local_ray_is_its_own_listens_on_loopback_and_reports_a_start_failure(monkeypatch) -> None:
    import ray  # the Ray tests only

    if ray.is_initialized():  # another test's cluster: this one must start its own
        ray.shutdown()
    tmp = _ray_temp_with_a_foreign_cluster()
    monkeypatch.setenv("RAY_TMPDIR", str(tmp))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    cfg = WorkerConfig(base=str(tmp / "no-such-model"), sources=[str(tmp / "no-such-model")], objectives=[],
                       task_paths=[])
    try:
        pool = RayPool(cfg, workers=1)
        try:
            nodes = ray.nodes()
            assert [n["NodeManagerAddress"] for n in nodes] == [LOOPBACK]  # not the foreign 203.0.113.9
            kids = [p.pid for p in psutil.Process().children(recursive=True)]
            ips = _listening(kids)
            assert ips and all(ip in (LOOPBACK, "::ffff:127.0.0.1") for ip in ips), ips
            with pytest.raises(WorkerStartError) as e:
                while True:
                    pool.wait(30)
            msg = str(e.value)
            assert msg.startswith("worker 0 could not start: ") and "\n" not in msg
            assert "creation task" not in msg and "no-such-model" in msg
        finally:
            pool.close()
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


def _env(tmp: Path, ray_tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    env.update(HF_HOME=str(tmp / "hf"), EVOMERGE_ZOO_DIR=str(tmp / "no-zoo-needed"), PYTHONUNBUFFERED="1",
               RAY_TMPDIR=str(ray_tmp), PYTHONPATH=str(ROOT))
    return env


@pytest.mark.slow
def test_search_with_a_broken_model_stops_in_one_line_then_resumes(tmp_path: Path, short_zoo: Path) -> None:
    """End to end: a model whose weights cannot be loaded (its header intact, so the space validates)
    stops `search` with exit 2 and the worker's own error; nothing is charged; once the weights are back,
    `resume` finishes. The Ray temp folder names a foreign cluster, which `search` must not join."""
    zoo = short_zoo
    models = tmp_path / "models"
    for name in ("base", "arith", "script"):
        shutil.copytree(zoo / name, models / name)
    weights = models / "script" / "model.safetensors"
    good = weights.read_bytes()
    header = 8 + int.from_bytes(good[:8], "little")
    weights.write_bytes(good[:header])  # the header says what is there; the tensors are gone
    sp = tmp_path / "space.yaml"
    sp.write_text(f"""
base_model: {models / "base"}
models: [{models / "arith"}, {models / "script"}]
genome: {{method: task_arithmetic, layer_groups: 2}}
objectives:
  - {{name: arith, task: demo_arith_search, metric: "exact_match,none", limit: 8}}
  - {{name: script, task: demo_script_search, metric: "exact_match,none", limit: 8}}
algorithm: {{name: random}}
evaluation: {{batch_size: 8, task_paths: [{TASKS}]}}
budget: 3
""")
    dbfile = tmp_path / "f.db"
    db = f"sqlite:///{dbfile}"
    ray_tmp = _ray_temp_with_a_foreign_cluster()
    env = _env(tmp_path, ray_tmp)
    cli = [sys.executable, "-m", "evomerge.cli"]
    try:
        r = subprocess.run(cli + ["search", "--space", str(sp), "--storage", db, "--study", "f", "--no-progress"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 2, r.stderr[-3000:]
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith("error: worker 0 could not start: "), r.stderr[-3000:]
        assert "Traceback" not in r.stderr and "creation task" not in r.stderr
        con = sqlite3.connect(dbfile)
        try:
            status = con.execute("select status, lease_owner from studies where name = 'f'").fetchone()
            rows = con.execute("select state, attempts from candidates").fetchall()
        finally:
            con.close()
        assert status == ("paused", None)
        assert all(state == "queued" and attempts == 0 for state, attempts in rows), rows

        weights.write_bytes(good)
        r = subprocess.run(cli + ["resume", "f", "--storage", db, "--no-progress"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        st = subprocess.run(cli + ["status", "--json", "--storage", db], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
        (row,) = json.loads(st.stdout)
        assert row["state"] == "done" and row["complete"] + row["failed"] == 3
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _session_processes(ray_tmp: Path, driver: int) -> list[tuple[int, str]]:
    """Processes of the Ray session whose temp folder is ``ray_tmp`` (its servers name it on their
    command line; its workers inherit it in their environment)."""
    out = []
    for q in psutil.process_iter(["pid", "name", "cmdline"]):
        if q.pid == driver:
            continue
        try:
            if str(ray_tmp) in " ".join(q.info["cmdline"] or []) or (
                    q.info["name"].startswith("ray::") and q.environ().get("RAY_TMPDIR") == str(ray_tmp)):
                out.append((q.pid, q.info["name"]))
        except psutil.Error:
            pass
    return out


@pytest.mark.slow
def test_killing_the_driver_process_group_leaves_no_worker(tmp_path: Path, short_zoo: Path) -> None:
    """kill -9 of the process group of a search with workers evaluating: 10 seconds later no process of
    its Ray session is left (the workers run in process groups of their own, and end with the raylet)."""
    import signal
    import time

    zoo = short_zoo
    sp = tmp_path / "space.yaml"
    sp.write_text(f"""
base_model: {zoo / "base"}
models: [{zoo / "arith"}, {zoo / "script"}]
genome: {{method: task_arithmetic, layer_groups: 2}}
objectives:
  - {{name: arith, task: demo_arith_search, metric: "exact_match,none", limit: 8}}
algorithm: {{name: random}}
evaluation: {{batch_size: 8, task_paths: [{TASKS}]}}
budget: 400
""")
    ray_tmp = Path(tempfile.mkdtemp(prefix="kp", dir="/tmp"))
    p = subprocess.Popen([sys.executable, "-m", "evomerge.cli", "search", "--space", str(sp), "--workers", "2",
                          "--storage", f"sqlite:///{tmp_path / 'k.db'}", "--no-progress"], cwd=tmp_path,
                         env=_env(tmp_path, ray_tmp), start_new_session=True, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 240:
            assert p.poll() is None, "the search ended before it could be killed"
            names = [n for _, n in _session_processes(ray_tmp, p.pid)]
            if sum(1 for n in names if n.startswith("ray::MergeWorkerActor") and "__init__" not in n) >= 2:
                break
            time.sleep(0.5)
        else:
            raise AssertionError("the workers did not start in 240 s")
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
        left = _session_processes(ray_tmp, p.pid)
        t1 = time.monotonic()
        while left and time.monotonic() - t1 < 10:
            time.sleep(0.5)
            left = _session_processes(ray_tmp, p.pid)
        assert not left, f"alive 10 s after kill -9 of the driver's process group: {left}"
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)
