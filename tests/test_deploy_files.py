"""The deployment files (docker/, workers/, storage/), checked statically: no Docker engine, Kubernetes or
Ray cluster runs here.

They parse; every `evomerge` command they run parses against the CLI itself (typer's command tree) and
every `ray start` against Ray's; the images install pyproject.toml's pins and carry the files the
commands run; ports, service names, images and secrets agree across the files; the head offers no
workers and the worker nodes offer the resources evomerge's Ray actors ask for; start-worker.sh joins
with the node's GPUs; the Ray cluster launcher accepts its YAML.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import stat
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import typer.main
import yaml
from packaging.requirements import Requirement

from evomerge.cli import app

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
VERSION = PROJECT["version"]
PINS = {Requirement(d).name.lower(): Requirement(d) for d in PROJECT["dependencies"]}
IMAGES = {f"evomerge:{VERSION}": DOCKER / "Dockerfile", f"evomerge-worker:{VERSION}": DOCKER / "Dockerfile.worker"}
IN_IMAGE = "/opt/evomerge/"  # where the images put the repository's files that commands run
# Commands another branch adds to the CLI; until it lands, only these options are accepted for them.
PENDING = {"dashboard": {"--host", "--port", "--storage"}}
RAY_PORT, DASHBOARD_PORT = 6379, 8000


def compose() -> dict[str, Any]:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def k8s() -> dict[str, Any]:
    """Kubernetes objects by (kind, name)."""
    out = {}
    for p in sorted((DOCKER / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(p.read_text()):
            out[(doc["kind"], doc["metadata"]["name"])] = doc
    return out


def cluster() -> dict[str, Any]:
    return yaml.safe_load((DOCKER / "ray-cluster.yaml").read_text())


# -- shell commands -----------------------------------------------------------------------------------

_VAR = re.compile(r"\$\{(\w+)(?::?([-?])([^}]*))?\}|\$\((\w+)\)|\$(\w+)")


def expand(text: str) -> str:
    """Variables as a shell, compose or Kubernetes would expand them: the default where one is given,
    else a placeholder word."""
    return _VAR.sub(lambda m: m.group(3) if m.group(2) == "-" else "VALUE", text)


def split_commands(script: str) -> list[list[str]]:
    """The simple commands of a shell script (split at &&, ||, ;, |), without `exec` and leading
    VAR=value assignments."""
    lex = shlex.shlex(expand(script), posix=True, punctuation_chars=";&|")
    lex.whitespace_split = True
    lex.commenters = "#"
    out, cur = [], []
    for tok in lex:
        if tok in ("&&", "||", ";", "|", "&"):
            out.append(cur)
            cur = []
        else:
            cur.append(tok)
    out.append(cur)
    cmds = []
    for c in out:
        while c and (c[0] == "exec" or re.fullmatch(r"\w+=.*", c[0])):
            c = c[1:]
        if c:
            cmds.append(c)
    return cmds


def dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, rest) of a Dockerfile, continuation lines joined, comments dropped."""
    lines = [ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln.strip() else "")
            for ln in text.splitlines() if ln.strip()]


def image_entrypoint(image: str) -> list[str]:
    entry = [json.loads(rest) for ins, rest in dockerfile(IMAGES[image]) if ins == "ENTRYPOINT"]
    return entry[-1]


def container_argv(image: str, entrypoint: Any, command: Any) -> list[list[str]]:
    """What a container runs: its entrypoint (the image's unless given) and command; `sh -c` scripts split."""
    entry = image_entrypoint(image) if entrypoint is None else list(entrypoint)
    cmd = [] if command is None else ([command] if isinstance(command, str) else list(command))
    if entry[:2] in (["/bin/sh", "-c"], ["sh", "-c"], ["/bin/bash", "-c"], ["bash", "-c"]):
        return split_commands(cmd[0])
    return [[expand(str(a)) for a in entry + cmd]]


def all_commands() -> Iterator[tuple[str, list[str]]]:
    """(where, argv) of every command the deployment files run."""
    for name, svc in compose()["services"].items():
        if "image" in svc and svc["image"] in IMAGES:
            for argv in container_argv(svc["image"], svc.get("entrypoint"), svc.get("command")):
                yield f"compose {name}", argv
    objs = k8s()
    for (kind, name), obj in objs.items():
        if kind == "RayJob":
            for argv in split_commands(obj["spec"]["entrypoint"]):
                yield f"RayJob {name}", argv
        if kind == "Deployment":
            for c in obj["spec"]["template"]["spec"]["containers"]:
                for a in container_argv(c["image"], c.get("command"), c.get("args")):
                    yield f"Deployment {name}", a
    cl = cluster()
    for key in ("head_start_ray_commands", "worker_start_ray_commands", "setup_commands"):
        for script in cl.get(key, []):
            yield from ((f"ray-cluster {key}", a) for a in split_commands(script))
    for image, path in IMAGES.items():
        cmd = [json.loads(rest) for ins, rest in dockerfile(path) if ins == "CMD"]
        yield from ((f"image {image}", a) for a in container_argv(image, None, cmd[-1] if cmd else None))
    for md in [DOCKER / "README.md", ROOT / "storage" / "README.md", ROOT / "workers" / "SIZING.md"]:
        for block in re.findall(r"```bash\n(.*?)```", md.read_text(), re.S):
            for line in re.sub(r"\\\n", " ", block).splitlines():
                yield from ((md.name, a) for a in split_commands(line))


def cli_tree():
    return typer.main.get_command(app)


def check_evomerge(args: list[str]) -> str:
    """Parse ``evomerge ARGS`` with the CLI's own parser; returns the command's path (raises on bad input)."""
    cmd, path, rest = cli_tree(), [], list(args)
    while rest and rest[0] in getattr(cmd, "commands", {}):
        path.append(rest[0])
        cmd = cmd.commands[rest.pop(0)]
    if not path and rest and rest[0] in PENDING:
        opts = {a.split("=")[0] for a in rest[1:] if a.startswith("--")}
        assert opts <= PENDING[rest[0]], f"evomerge {rest[0]}: options {opts - PENDING[rest[0]]}"
        return rest[0]
    if rest == ["--help"]:
        return " ".join(path) or "--help"
    assert not hasattr(cmd, "commands"), f"`evomerge {' '.join(args)}`: no such command"
    cmd.make_context(" ".join(["evomerge", *path]), rest)
    return " ".join(path)


def ray_start_command():
    from ray.scripts.scripts import cli  # Ray's own CLI: the options `ray start` takes

    return cli.commands["start"]


def wait_script():
    spec = importlib.util.spec_from_file_location("wait_for_workers", DOCKER / "wait-for-workers.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# -- the files parse, and what they run exists ---------------------------------------------------------

def test_every_yaml_parses_and_every_command_runs_something_that_exists() -> None:
    seen: dict[str, set[str]] = {"evomerge": set(), "ray": set(), "scripts": set()}
    start, wait = ray_start_command(), wait_script()
    for where, argv in all_commands():
        prog = argv[0]
        if prog == "evomerge":
            seen["evomerge"].add(check_evomerge(argv[1:]))
        elif prog == "ray":
            assert argv[1] == "start", (where, argv)
            start.make_context("start", argv[2:])
            seen["ray"].add(" ".join(a for a in argv[2:] if a == "--head"))
        elif prog in ("python", "python3"):
            assert argv[1] == IN_IMAGE + "docker/wait-for-workers.py", (where, argv)
            wait.parser().parse_args(argv[2:])
            seen["scripts"].add(argv[1])
        elif prog.startswith(IN_IMAGE):
            assert (ROOT / prog.removeprefix(IN_IMAGE)).is_file(), (where, prog)
            seen["scripts"].add(prog)
        elif (ROOT / prog).is_file():  # a script of the repository, named by its path in the docs
            assert where.endswith(".md") and os.access(ROOT / prog, os.X_OK), (where, prog)
        elif prog == "hf":
            assert argv[1] == "download", (where, argv)
        else:
            # placeholders in the docs (`storage/backup.sh URL FILE`, createdb, psql, docker, kubectl)
            assert where.endswith(".md") or prog in ("pg_isready",), (where, argv)
    # what the deployment is for: searches, resumes, the dashboard, the schema, copies between stores
    assert {"search", "resume", "dashboard", "storage upgrade", "storage copy"} <= seen["evomerge"]
    assert seen["ray"] == {"--head", ""}  # heads and nodes that join one
    assert IN_IMAGE + "workers/start-worker.sh" in seen["scripts"]


@pytest.mark.parametrize("bad", [["search", "--space", "s.yaml", "--wrokers", "2"], ["resume"], ["serach"],
                                 ["storage", "copy", "a"], ["dashboard", "--storage", "x", "--debug"]])
def test_the_command_check_catches_a_bad_command(bad: list[str]) -> None:
    with pytest.raises(Exception):  # noqa: B017 - typer's usage errors, or the check's own assertion
        check_evomerge(bad)


def test_files_the_commands_run_are_in_the_images() -> None:
    copied = {}
    for image, path in IMAGES.items():
        for ins, rest in dockerfile(path):
            if ins == "COPY" and "--from" not in rest:
                *srcs, dst = rest.split()
                for s in srcs:
                    assert (ROOT / s).exists(), f"{path.name}: COPY {s}: no such file"
                    copied.setdefault(image, set()).add(dst.rstrip("/") + ("/" if (ROOT / s).is_dir() else ""))
    for where, argv in all_commands():
        for a in argv[:2]:
            if a.startswith(IN_IMAGE):
                images = {img for img, dsts in copied.items() if any(a == d or a.startswith(d) for d in dsts)}
                assert images, f"{where}: {a} is in no image"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert not {"evomerge", "pyproject.toml", "storage", "workers", "docker", "search_spaces"} & set(ignored)


# -- images ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("image", sorted(IMAGES))
def test_images_install_the_pins_of_pyproject(image: str) -> None:
    steps = dockerfile(IMAGES[image])
    froms = [rest for ins, rest in steps if ins == "FROM"]
    assert len(froms) >= 2, "multi-stage: the build tools stay out of the final image"
    args = dict(re.findall(r"^(\w+)=(\S+)", "\n".join(rest for ins, rest in steps if ins == "ARG"), re.M))
    for f in froms:
        base = expand(f.split()[0]).replace("VALUE", "")
        base = args.get(f.split()[0].strip("${}"), base)
        assert ":" in base and not base.endswith(":latest"), f"{image}: FROM {base} has no pinned tag"
    installs = [rest for ins, rest in steps if ins == "RUN" and "pip install" in rest]
    specs = [t for r in installs for t in shlex.split(r) if re.match(r"^[A-Za-z][\w.\-\[\]]*[=<>]=", t)]
    for s in specs:
        req = Requirement(s)
        assert req.name.lower() in PINS and str(PINS[req.name.lower()].specifier) == str(req.specifier), s
    assert any(re.search(r"pip install (--no-deps )?/src\b", r) for r in installs), "the project itself"
    text = IMAGES[image].read_text()
    if "requirements.txt" in text:
        assert "pip install -r /tmp/requirements.txt" in text and "--no-deps /src" in text
    else:  # the driver's: torch first (its CPU build), then the project resolves the rest from its pins
        assert specs == ["torch==2.13.0"] and "download.pytorch.org/whl/cpu" in text
    assert "3.11" in text and PROJECT["requires-python"] == ">=3.11,<3.12"


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_dockerfile_lint(image: str) -> None:
    steps = dockerfile(IMAGES[image])
    final = steps[max(i for i, (ins, _) in enumerate(steps) if ins == "FROM"):]
    users = [rest for ins, rest in final if ins == "USER"]
    assert users and users[-1] not in ("root", "0"), "the final stage runs as a user, not root"
    for ins, rest in steps:
        if ins == "RUN" and "apt-get install" in rest:
            assert "--no-install-recommends" in rest and "rm -rf /var/lib/apt/lists/*" in rest, rest
            assert "apt-get update" in rest, "update and install in one layer"
        if ins in ("ENTRYPOINT", "CMD"):
            assert rest.startswith("["), f"{ins} in exec form, so signals reach the process"
        assert ins in {"FROM", "ARG", "ENV", "RUN", "COPY", "USER", "WORKDIR", "EXPOSE", "ENTRYPOINT", "CMD"}, ins
    env = " ".join(rest for ins, rest in final if ins == "ENV")
    # Ray refuses nodes whose Python differs in the patch level unless told to compare minor versions:
    # the two images get Python 3.11 from Debian's and Ubuntu's packages.
    assert "RAY_DEFAULT_PYTHON_VERSION_MATCH_LEVEL=minor" in env and "/opt/venv/bin" in env


def test_worker_requirements_are_pyprojects_pins() -> None:
    lines = [ln.strip() for ln in (ROOT / "workers" / "requirements.txt").read_text().splitlines()]
    reqs = [Requirement(ln) for ln in lines if ln and not ln.startswith("#")]
    assert [str(r) for r in reqs] == [str(Requirement(d)) for d in PROJECT["dependencies"]]


def test_image_names_and_versions_agree_everywhere() -> None:
    c = compose()
    built = {svc["image"]: svc["build"]["dockerfile"] for svc in c["services"].values() if "build" in svc}
    assert built == {img: str(p.relative_to(ROOT)) for img, p in IMAGES.items()}
    used = {svc["image"] for svc in c["services"].values()}
    for obj in k8s().values():
        text = yaml.safe_dump(obj)
        used |= set(re.findall(r"image: (\S+)", text))
    d = cluster()["docker"]
    used |= {d["head_image"], d["worker_image"]}
    assert used - {"postgres:15-bookworm"} == set(IMAGES)
    assert k8s()[("RayCluster", "evomerge")]["spec"]["rayVersion"] == str(PINS["ray"].specifier).lstrip("=")


# -- ports, services, secrets -------------------------------------------------------------------------

def _opt(argv: list[str], name: str) -> str | None:
    for i, a in enumerate(argv):
        if a == name:
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def test_compose_hosts_and_ports_agree() -> None:
    c = compose()
    services = c["services"]
    listens: dict[str, set[int]] = {"postgres": {5432}}
    for name, svc in services.items():
        if svc.get("image") in IMAGES:
            for argv in container_argv(svc["image"], svc.get("entrypoint"), svc.get("command")):
                if argv[:2] == ["ray", "start"] and "--head" in argv:
                    ports = {int(_opt(argv, "--port")), int(_opt(argv, "--dashboard-port"))}
                    listens.setdefault(name, set()).update(ports)
                if argv[:2] == ["evomerge", "dashboard"]:
                    listens.setdefault(name, set()).add(int(_opt(argv, "--port")))
    assert listens["ray-head"] == {RAY_PORT, 8265} and listens["dashboard"] == {DASHBOARD_PORT}
    text = expand(yaml.safe_dump({n: {k: v for k, v in s.items() if k != "image"} for n, s in services.items()}))
    refs = set(re.findall(r"(?<![\w.-])([a-z][a-z0-9-]*):(\d{2,5})\b", text))
    refs = {(h, int(p)) for h, p in refs if h not in ("http", "https", "postgresql+psycopg")}
    assert refs, "the services refer to each other"
    for host, port in refs:
        assert host in services, f"{host}:{port}: no such service"
        assert port in listens[host], f"{host}:{port}: {host} listens on {listens[host]}"
    for name, svc in services.items():
        for mapping in svc.get("ports", []):
            assert int(str(mapping).split(":")[-1]) in listens[name], (name, mapping)
    steps = dockerfile(IMAGES[f"evomerge:{VERSION}"])
    exposed = {int(p) for ins, rest in steps if ins == "EXPOSE" for p in rest.split()}
    assert {RAY_PORT, 8265, DASHBOARD_PORT} <= exposed
    for svc in services.values():  # depends_on names services
        deps = svc.get("depends_on", [])
        assert set(deps) <= set(services)
    assert set(c["volumes"]) == {v.split(":")[0] for s in services.values() for v in s.get("volumes", [])
                                 if not v.startswith(".")}


def test_kubernetes_objects_refer_to_each_other() -> None:
    objs = k8s()
    rc = objs[("RayCluster", "evomerge")]
    secret = objs[("Secret", "evomerge-storage")]
    claims = {n for (kind, n) in objs if kind == "PersistentVolumeClaim"}
    for (kind, name), obj in objs.items():
        text = yaml.safe_dump(obj)
        for ref in re.findall(r"secretKeyRef:\s*\n\s*key: (\S+)\n\s*name: (\S+)", text):
            assert ref[1] == "evomerge-storage" and ref[0] in secret["stringData"], (kind, name, ref)
        for claim in re.findall(r"claimName: (\S+)", text):
            assert claim in claims, (kind, name, claim)
        if kind == "RayJob":
            assert obj["spec"]["clusterSelector"] == {"ray.io/cluster": rc["metadata"]["name"]}
            assert '"$EVOMERGE_STORAGE"' in obj["spec"]["entrypoint"]  # from the Secret, on the head
    head = rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {p["name"]: p["containerPort"] for p in head["ports"]}["gcs-server"] == RAY_PORT
    assert any(e["name"] == "EVOMERGE_STORAGE" and e["valueFrom"]["secretKeyRef"]["key"] == "url" for e in head["env"])
    dep = objs[("Deployment", "evomerge-dashboard")]["spec"]["template"]["spec"]["containers"][0]
    svc = objs[("Service", "evomerge-dashboard")]["spec"]
    port = int(_opt(dep["args"], "--port"))
    named = {p["name"]: p["containerPort"] for p in dep["ports"]}
    assert port == DASHBOARD_PORT == named[svc["ports"][0]["targetPort"]]
    assert "dashboard-url" in yaml.safe_dump(dep["env"])  # the SELECT-only role
    assert svc["selector"] == objs[("Deployment", "evomerge-dashboard")]["spec"]["selector"]["matchLabels"]


def test_ray_cluster_launcher_accepts_its_yaml() -> None:
    # the path `ray up` takes: defaults filled in, then Ray's schema and checks
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = cluster()
    validate_config(prepare_config(cfg))
    head = split_commands(cfg["head_start_ray_commands"][0])[0]
    worker = split_commands(cfg["worker_start_ray_commands"][0])[0]
    assert int(_opt(head, "--port")) == RAY_PORT and worker[1] == f"VALUE:{RAY_PORT}"
    assert "EVOMERGE_BLOCK=0" in cfg["worker_start_ray_commands"][0]  # the launcher's command must return
    assert "--entrypoint=" in cfg["docker"]["run_options"]  # the launcher runs `bash` in the container


# -- the resources evomerge schedules on --------------------------------------------------------------

def actor_options(monkeypatch, gpus: int) -> dict[str, Any]:
    """What RayPool asks of Ray for each worker, on a cluster with ``gpus`` GPUs (a stand-in for ray)."""
    from evomerge.run.pool import RayPool

    asked: list[dict] = []

    class Remote:
        def options(self, **opts):
            asked.append(opts)
            return self

        def remote(self, cfg):
            return SimpleNamespace(ready=SimpleNamespace(remote=lambda: object()))

    err = type("E", (Exception,), {})
    fake = SimpleNamespace(
        is_initialized=lambda: True, remote=lambda cls: Remote(), nodes=lambda: [{"Alive": True}],
        cluster_resources=lambda: {"CPU": 16.0, **({"GPU": float(gpus)} if gpus else {})},
        exceptions=SimpleNamespace(RayActorError=err, WorkerCrashedError=err, NodeDiedError=err),
    )
    monkeypatch.setitem(sys.modules, "ray", fake)
    RayPool(SimpleNamespace(sources=["a", "b"], base="base"), workers=2)  # a WorkerConfig as far as it is read
    assert len(asked) == 2 and asked[0] == asked[1]
    return {k: v for k, v in asked[0].items() if k in ("num_gpus", "num_cpus", "resources")}


def test_heads_offer_nothing_and_worker_nodes_offer_what_the_actors_ask(monkeypatch) -> None:
    gpu_opts, cpu_opts = actor_options(monkeypatch, 4), actor_options(monkeypatch, 0)
    assert gpu_opts == {"num_gpus": 1, "num_cpus": 1} and cpu_opts == {"num_cpus": 1}
    # heads: no CPU or GPU for an evomerge worker, wherever the head is started
    c = compose()
    heads = [a for s in c["services"].values() if s.get("image") in IMAGES
             for a in container_argv(s["image"], s.get("entrypoint"), s.get("command")) if "--head" in a]
    heads += [split_commands(x)[0] for x in cluster()["head_start_ray_commands"]]
    rc = k8s()[("RayCluster", "evomerge")]["spec"]
    heads.append([f"--{k}={v}" for k, v in rc["headGroupSpec"]["rayStartParams"].items()])
    # KubeRay hands rayStartParams to `ray start` as --KEY=VALUE: each must be an option taking a value
    for params in [rc["headGroupSpec"]["rayStartParams"], *(g["rayStartParams"] for g in rc["workerGroupSpecs"])]:
        ray_start_command().make_context("start", ["--head", *(f"--{k}={v}" for k, v in params.items())])
    assert len(heads) == 3
    for h in heads:
        assert _opt(h, "--num-cpus") == "0" and _opt(h, "--num-gpus") == "0", h
    # a driver's own node (compose's search and resume) offers nothing either
    for name in ("search", "resume"):
        svc = c["services"][name]
        argvs = container_argv(svc["image"], svc["entrypoint"], svc["command"])
        joins = [a for a in argvs if a[:2] == ["ray", "start"]]
        assert joins and all(_opt(a, "--num-cpus") == "0" and _opt(a, "--num-gpus") == "0" for a in joins)
    # GPU worker nodes: all their GPUs (compose, KubeRay's nvidia.com/gpu limit, the launcher's docker run)
    devices = c["services"]["ray-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    for group in k8s()[("RayCluster", "evomerge")]["spec"]["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] >= gpu_opts["num_gpus"]
        assert int(limits["cpu"]) >= limits["nvidia.com/gpu"] * gpu_opts["num_cpus"]
        assert "num-gpus" not in group["rayStartParams"]  # KubeRay takes it from the limit
    assert "--gpus all" in cluster()["docker"]["worker_run_options"]


# -- workers/start-worker.sh ---------------------------------------------------------------------------

SCRIPTS = sorted([*ROOT.glob("workers/*.sh"), *ROOT.glob("storage/*.sh"), *ROOT.glob("docker/**/*.sh")])


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_scripts_parse_and_are_executable(script: Path) -> None:
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    assert script.stat().st_mode & stat.S_IXUSR and script.read_text().startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in script.read_text()


@pytest.fixture
def stub_bin(tmp_path: Path) -> Path:
    """A PATH folder with a `ray` that records its arguments and an `nvidia-smi` listing $GPUS GPUs."""
    b = tmp_path / "bin"
    b.mkdir()
    (b / "ray").write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$RAY_ARGS"\n')
    (b / "nvidia-smi").write_text('#!/usr/bin/env bash\nfor ((i = 0; i < GPUS; i++)); do echo $i; done\n')
    for f in b.iterdir():
        f.chmod(0o755)
    return b


def start_worker(stub_bin: Path, *args: str, gpus: int | None = 2, **env: str) -> tuple[int, str, list[str]]:
    out = stub_bin.parent / "ray-args"
    out.unlink(missing_ok=True)
    path = f"{stub_bin}:/usr/bin:/bin"
    if gpus is None:
        (stub_bin / "nvidia-smi").unlink(missing_ok=True)
    e = {"PATH": path, "RAY_ARGS": str(out), "GPUS": str(gpus or 0), **env}
    r = subprocess.run(["bash", str(ROOT / "workers" / "start-worker.sh"), *args], capture_output=True, text=True,
                       env=e, timeout=30)
    return r.returncode, r.stderr, out.read_text().splitlines() if out.exists() else []


def test_start_worker_joins_with_every_gpu(stub_bin: Path) -> None:
    rc, err, argv = start_worker(stub_bin, "10.0.0.10:6380", "--object-store-memory", "1000000000")
    assert rc == 0, err
    assert argv[0] == "start" and _opt(argv, "--address") == "10.0.0.10:6380"
    cpus = os.cpu_count() or 1
    assert _opt(argv, "--num-gpus") == "2" and int(_opt(argv, "--num-cpus")) == cpus
    assert argv[-2:] == ["--object-store-memory", "1000000000"] and "--block" not in argv
    ray_start_command().make_context("start", argv[1:])  # Ray takes every option it was given
    _, _, argv = start_worker(stub_bin, "head", EVOMERGE_BLOCK="1", EVOMERGE_NUM_CPUS="64")
    assert _opt(argv, "--address") == f"head:{RAY_PORT}" and "--block" in argv and _opt(argv, "--num-cpus") == "64"
    rc, err, argv = start_worker(stub_bin, "head:6379", gpus=None, EVOMERGE_NUM_GPUS="0")
    assert rc == 0 and _opt(argv, "--num-gpus") == "0"  # a CPU node, asked for


@pytest.mark.parametrize("args,env,gpus,words", [
    ((), {}, 2, "usage"),
    (("--address",), {}, 2, "usage"),
    (("head",), {}, None, "no GPU found"),
    (("head",), {}, 0, "no GPU found"),
    (("head",), {"EVOMERGE_NUM_GPUS": "two"}, 2, "whole number"),
    (("head",), {"EVOMERGE_NUM_CPUS": "1"}, 4, "each evomerge worker takes one GPU and one CPU"),
])
def test_start_worker_refuses_in_one_line(stub_bin: Path, args, env, gpus, words) -> None:
    rc, err, argv = start_worker(stub_bin, *args, gpus=gpus, **env)
    assert rc == 2 and words in err and err.count("\n") == 1 and argv == [], err


@pytest.mark.slow
def test_wait_for_workers_waits_for_what_the_cluster_offers() -> None:
    """docker/wait-for-workers.py against a real (local, one-CPU) Ray cluster: enough CPUs at once; GPUs
    that never come: exit 1 after the timeout, in one line."""
    import ray

    from evomerge.run.pool import start_local_ray

    if ray.is_initialized():  # another test's cluster: this one needs its own
        ray.shutdown()
    start_local_ray(ray, 1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        addr = ray.get_runtime_context().gcs_address
        # the local cluster listens on 127.0.0.1: the script's process must see itself there too
        env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}

        def wait(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, str(DOCKER / "wait-for-workers.py"), addr, *args],
                                  capture_output=True, text=True, env=env, timeout=120)

        r = wait("1", "--resource", "CPU")
        assert r.returncode == 0 and r.stdout == "the cluster offers 1 CPU\n", r.stderr
        r = wait("1", "--timeout", "2")
        assert r.returncode == 1 and r.stderr == "error: the cluster offers 0 GPU after 2s, 1 needed\n", r.stderr
    finally:
        ray.shutdown()
