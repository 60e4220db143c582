"""A Ray cluster of several nodes on 127.0.0.1, each node a ``ray start --block`` process of its own.

Used by the multi-node tests and ``bench/multinode.py``. Every node has its own ports and the cluster
its own temp folder; the cluster authenticates with Ray's token auth, its token in a file of its own
(``RAY_AUTH_TOKEN_PATH``), which every process that joins is given through ``env``. Only processes this
object started are ever stopped (a node's ``ray start`` and every process under it); never ``ray stop``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopbackCluster:
    """``start_head()``, ``add_node(cpus)`` (returns its index), ``kill_node(i)`` (kill -9 of the node's
    whole process tree), ``close()``. ``address`` is what ``--ray-address`` takes; ``env`` is the
    environment a process joining the cluster needs."""

    def __init__(self, root: Path | None = None) -> None:
        # Ray's Unix socket paths are limited to ~100 characters: a short folder under /tmp
        self.root = Path(tempfile.mkdtemp(prefix="lc", dir="/tmp")) if root is None else root
        self.token = self.root / "token"
        self.token.write_text(secrets.token_hex(32) + "\n")
        self.token.chmod(0o600)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: list[subprocess.Popen | None] = []
        self.logs: list[Path] = []
        drop = ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")  # several nodes need clusters on
        env = {k: v for k, v in os.environ.items() if k not in drop}
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token),
                   RAY_TMPDIR=str(self.root), RAY_USAGE_STATS_ENABLED="0")
        self.worker_env = dict(env)  # a node joining a cluster needs Ray's multi-node mode
        # The head and the drivers: Ray's one-machine mode keeps every address 127.0.0.1 (in multi-node
        # mode Ray swaps a loopback address for the machine's routable one)
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        self.env = env

    def _launch(self, args: list[str], env: dict[str, str], ray: list[str] | None = None) -> int:
        i = len(self.nodes)
        env = {**env, "LOOPBACK_NODE": str(i)}  # inherited by the node's workers: which node ran a task
        log = self.root / f"node{i}.log"
        with open(log, "wb") as f:
            p = subprocess.Popen([*(ray or [RAY]), "start", "--block", "--disable-usage-stats", *args], env=env,
                                 stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        self.nodes.append(p)
        self.logs.append(log)
        return i

    def start_head(self, cpus: int = 0, dashboard: bool = False, timeout: float = 120) -> int | None:
        """The head node; with ``dashboard`` its dashboard runs too (what ``ray job submit`` talks to),
        and its port is returned."""
        dash = free_port() if dashboard else None
        ui = (["--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash)]
              if dashboard else ["--include-dashboard", "false"])
        self._launch(["--head", "--node-ip-address", "127.0.0.1", "--port", str(self.port),
                      "--temp-dir", str(self.root), "--num-cpus", str(cpus), "--num-gpus", "0", *ui,
                      "--dashboard-agent-listen-port", str(free_port())], self.env)
        self.wait_nodes(None, timeout)
        return dash

    def add_node(self, cpus: int, timeout: float = 120) -> int:
        port = free_port()
        i = self._launch(["--address", self.address, "--node-ip-address", "127.0.0.1", "--num-cpus", str(cpus),
                          "--num-gpus", "0", "--node-manager-port", str(port),
                          "--object-manager-port", str(free_port()),
                          "--dashboard-agent-listen-port", str(free_port()),
                          "--min-worker-port", "0", "--max-worker-port", "0"], self.worker_env,
                         [sys.executable, "-c", _LOOPBACK_NODE])
        self.wait_nodes(port, timeout)
        return i

    def alive_ports(self) -> list[int]:
        """The node-manager ports of the nodes Ray counts alive (a killed node stays alive to Ray for
        some seconds)."""
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        except OSError:
            return []  # the head's GCS is not listening yet (a Ray client would wait for it)
        r = subprocess.run([sys.executable, "-c", _ALIVE_PORTS, self.address], env=self.env,
                           capture_output=True, text=True, timeout=60)
        try:
            return [int(v) for v in r.stdout.strip().splitlines()[-1].split(",") if v]
        except (ValueError, IndexError):
            return []

    def actors_per_node(self, class_name: str) -> dict[int, int]:
        """Alive actors of ``class_name`` per node (by node-manager port), from Ray's actor table."""
        r = subprocess.run([sys.executable, "-c", _ACTORS, self.address, class_name], env=self.env,
                           capture_output=True, text=True, timeout=60)
        try:
            return {int(k): v for k, v in json.loads(r.stdout.strip().splitlines()[-1]).items()}
        except (ValueError, IndexError):
            return {}

    def wait_nodes(self, port: int | None, timeout: float) -> None:
        """Until the node whose node manager listens on ``port`` is alive (None: any node, the head)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            for i, p in enumerate(self.nodes):
                if p is not None and p.poll() is not None:
                    raise RuntimeError(f"ray node {i} exited: {self.logs[i].read_text()[-2000:]}")
            ports = self.alive_ports()
            if ports if port is None else port in ports:
                return
            time.sleep(1)
        raise TimeoutError(f"Ray node not up in {timeout} s: {self.logs[-1].read_text()[-2000:]}")

    def processes(self, i: int) -> list[psutil.Process]:
        """Node ``i``'s ``ray start`` and every process under it."""
        p = self.nodes[i]
        if p is None:
            return []
        try:
            top = psutil.Process(p.pid)
            return [top, *top.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def kill_node(self, i: int) -> int:
        """kill -9 of node ``i``: its raylet and every process under it (workers included); returns how
        many processes were killed."""
        procs = self.processes(i)
        # Workers run in process groups of their own: kill every one by pid, children first
        for q in reversed(procs):
            try:
                q.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        p = self.nodes[i]
        if p is not None:
            p.wait(timeout=30)
        self.nodes[i] = None
        return len(procs)

    def close(self) -> None:
        for i in reversed(range(len(self.nodes))):
            if self.nodes[i] is not None:
                self.kill_node(i)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> LoopbackCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# `ray start` for a node joining the cluster: Ray's multi-node mode (which joining needs) swaps a loopback
# address for the machine's routable one, in the node's own address and in the head's; keep 127.0.0.1.
_LOOPBACK_NODE = """
import sys
from ray._private import services
services.resolve_ip_for_localhost = lambda host: host
from ray.scripts.scripts import main
sys.argv = ["ray", *sys.argv[1:]]
main()
"""

# The nodes alive: through Ray's state API in a process of its own (the caller's may be a driver of
# another cluster).
_ALIVE_PORTS = """
import sys, ray
ray.init(address=sys.argv[1], log_to_driver=False, configure_logging=False)
print(",".join(str(n["NodeManagerPort"]) for n in ray.nodes() if n["Alive"]))
"""


class SleepActor:
    """A worker without models for pool tests on a cluster: sleeps ``EVOMERGE_FAKE_S`` seconds, scores a
    recipe by its hash, and says in its timings which node ran it."""

    def __init__(self, cfg: object = None) -> None:
        self.delay = float(os.environ.get("EVOMERGE_FAKE_S", "0.3"))

    def ready(self) -> None:
        return None

    def evaluate(self, number: int, recipe_json: str, objectives: list[str], *rest: object) -> dict:
        time.sleep(self.delay)
        h = sum(recipe_json.encode()) % 997 / 997
        scores = {"a": h, "b": 1.0 - h}
        return {"number": number, "scores": {o: scores[o] for o in objectives},
                "samples": {o: [scores[o]] for o in objectives}, "error": None, "worker": "sleep",
                "timings": {"evaluate_s": self.delay, "node": float(os.environ.get("LOOPBACK_NODE", "-1"))}}


_ACTORS = """
import collections, json, sys, ray
ray.init(address=sys.argv[1], log_to_driver=False, configure_logging=False)
port = {n["NodeID"]: n["NodeManagerPort"] for n in ray.nodes()}
count = collections.Counter(port.get(a["Address"]["NodeID"]) for a in ray._private.state.actors().values()
                            if a["State"] == "ALIVE" and a["ActorClassName"].endswith(sys.argv[2]))
print(json.dumps({str(k): v for k, v in count.items() if k is not None}))
"""
