"""A driver process for fault injection: it runs one stored study (or ``storage upgrade``) and, when asked,
kills itself with SIGKILL just before its Nth SQL statement, mid-transaction included: a kill -9 that
lands between any two statements the driver sends, with no cleanup of any kind.

    python tests/fault_driver.py run URL STUDY --kill-at N --log EVALS --phases PHASES
    python tests/fault_driver.py upgrade URL --kill-at N

Without ``--kill-at`` (or with 0) it runs to the end and prints, as JSON, how many statements it sent
and the first and last statement of each phase, which is how a test picks its kill points. Evaluations
run on two in-process workers that score a recipe by its bytes and append ``search N`` or ``report N``
to the EVALS file as they start, so a test counts evaluations across the killed and resumed processes.
With ``--die-at K`` the Kth evaluation raises instead, as a worker that dies would.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

from sqlalchemy import Engine, event

_state = {"statements": 0, "phase": "open", "kill_at": 0, "evaluations": 0, "die_at": 0}
_phases: dict[str, list[int]] = {}
_phase_file: list[Path] = []


def _enter(phase: str) -> None:
    _state["phase"] = phase


@event.listens_for(Engine, "before_cursor_execute")
def _count(conn, cursor, statement, parameters, context, executemany) -> None:  # noqa: ANN001 - event API
    _state["statements"] += 1
    n, phase = _state["statements"], _state["phase"]
    span = _phases.setdefault(phase, [n, n])
    span[1] = n
    if n == _state["kill_at"]:
        if _phase_file:
            _phase_file[0].write_text(phase)
        os.kill(os.getpid(), signal.SIGKILL)


class LoggedWorker:
    """Deterministic scores from the recipe's bytes; every evaluation is logged as it starts."""

    log_fd = -1
    report: list[str] = []

    def evaluate(self, number, recipe_json, objective_names=None, front=None, fidelity=None) -> dict:  # noqa: ANN001
        names = list(objective_names or [])
        kind = "report" if names and set(names) <= set(self.report) else "search"
        os.write(self.log_fd, f"{kind} {number}\n".encode())
        _state["evaluations"] += 1
        if _state["evaluations"] == _state["die_at"]:
            raise RuntimeError("worker lost")
        h = sum(recipe_json.encode()) % 997 / 997
        scores = {"a": h, "b": 1.0 - h, "held": (h * 7) % 1.0}
        return {"number": number, "scores": {n: scores[n] for n in names},
                "samples": {n: [scores[n]] for n in names}, "timings": {"evaluate_s": 0.0}, "error": None,
                "worker": "logged"}


def _run(args: argparse.Namespace) -> None:
    from evomerge.run import InProcessPool, StudyRun
    from evomerge.run import loop as loop_module
    from evomerge.space import parse_space_text
    from evomerge.store import Store

    LoggedWorker.log_fd = os.open(args.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    store = Store(args.url)
    space = parse_space_text(store.get_study(args.study).space_yaml, origin="study")
    LoggedWorker.report = [o.name for o in space.report]

    search, report = StudyRun._search, loop_module.score_report

    def phased_search(self, pool) -> None:  # noqa: ANN001
        _enter("search")
        search(self, pool)
        _enter("finish")

    def phased_report(*a, **kw) -> int:
        _enter("report")
        try:
            return report(*a, **kw)
        finally:
            _enter("finish")

    StudyRun._search = phased_search
    loop_module.score_report = phased_report
    _enter("start-up")
    StudyRun(space, store, args.study, show_progress=False,
             pool=lambda cfg: InProcessPool(LoggedWorker, workers=2)).run()
    _enter("closed")


def _upgrade(args: argparse.Namespace) -> None:
    from evomerge.store import Store

    _enter("upgrade")
    Store(args.url)  # opening a store for writing applies the pending migrations


# -- the sweep, shared by tests/test_faults.py and bench/faults.py ------------------------------------

# Every candidate is on the front (a + b = 1), so report scoring takes as long as the search.
SPACE = """
base_model: {base}
models: [{e0}, {e1}]
genome: {{method: task_arithmetic, layer_groups: model}}
objectives:
  - {{name: a, task: t1, metric: "exact_match,none"}}
  - {{name: b, task: t2, metric: "exact_match,none"}}
report:
  - {{name: held, task: t3, metric: "exact_match,none"}}
algorithm: {{name: nsga2, settings: {{pop_size: 4}}}}
budget: 10
seed: 5
evaluation: {{task_paths: [tasks], max_attempts: 3}}
"""


def study_space_yaml(folder: Path) -> str:
    """The stored form of ``SPACE`` over a tiny model family and placeholder tasks made in ``folder``."""
    # models and pydantic only for the callers that build a study; the driver process itself needs neither
    from fixtures_models import make_tiny_llama_family, placeholder_tasks

    from evomerge.space import dump_space, load_space

    base, experts = make_tiny_llama_family(folder / "family", n_experts=2, seed=0)
    placeholder_tasks(folder, ("t1", "t2", "t3"))
    (folder / "s.yaml").write_text(SPACE.format(base=base, e0=experts[0], e1=experts[1]))
    return dump_space(load_space(folder / "s.yaml"))


def new_study(url: str, space_yaml: str) -> None:
    """Study ``s`` of ``space_yaml`` (budget 10, two objectives), created as `evomerge search` would."""
    from evomerge.store import Store

    with Store(url) as store:
        store.create_study("s", space_yaml, [{"name": "a", "direction": "maximize"},
                                             {"name": "b", "direction": "maximize"}], budget=10)


def drive(*args: str) -> subprocess.CompletedProcess:
    """This file as a process of its own (a kill -9 must not take the caller with it)."""
    return subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).resolve().parents[1])


def final_state(url: str, study: str = "s") -> list[tuple]:
    """The study's status and lease holder, then every candidate's number, recipe hash, state and scores."""
    from evomerge.store import Store

    store = Store(url, read_only=True)
    try:
        st = store.get_study(study)
        return [(st.status, st.lease_owner)] + [(c.number, c.recipe_hash, c.state, c.scores)
                                                for c in store.candidates(study)]
    finally:
        store.close()


def evaluations(log: Path) -> Counter:
    """(kind, number) -> how many evaluations started, across every process that wrote the log."""
    return Counter(tuple(line.split()) for line in log.read_text().splitlines()) if log.exists() else Counter()


def _left_in_flight(url: str, study: str, report: str) -> tuple[set[int], set[int]]:
    """What a dead run left: candidates it had running, and front members still without a report score."""
    from evomerge.store import Store
    from evomerge.view import StudyView

    store = Store(url, read_only=True)
    try:
        running = {c.number for c in store.candidates(study, "running")}
        unscored = {c.number for c in StudyView(store).front(study) if report not in c.scores}
        return running, unscored
    finally:
        store.close()


def kill_and_resume(url: str, n: int, work: Path, study: str = "s", report: str = "held") -> dict:
    """Kill a run of ``study`` at statement ``n``, resume it in a new process; what happened, as data."""
    log, phase_file = work / f"k{n}.log", work / f"k{n}.phase"
    killed = drive("run", url, study, "--log", str(log), "--kill-at", str(n), "--phases", str(phase_file))
    out = {"n": n, "killed": killed.returncode == -9, "phase": phase_file.read_text() if phase_file.exists() else None}
    running, unscored = _left_in_flight(url, study, report)
    before = evaluations(log)
    resumed = drive("run", url, study, "--log", str(log))
    again = evaluations(log) - before
    twice = {key for key in again if before[key]}
    out.update(
        resumed=resumed.returncode == 0, stderr=resumed.stderr[-2000:], final=final_state(url, study),
        running=sorted(running), unscored=sorted(unscored),
        twice_search=sorted(int(k[1]) for k in twice if k[0] == "search"),
        twice_report=sorted(int(k[1]) for k in twice if k[0] == "report"),
        evaluated_twice=sum(again[k] for k in twice), most_evaluations=max(evaluations(log).values(), default=0),
    )
    return out


def kill_points(phases: dict[str, list[int]], per_phase: int) -> list[int]:
    """Statements spread over each phase of a run: its first, its last and some between (0: every one)."""
    points: set[int] = set()
    for first, last in phases.values():
        k = last - first + 1 if per_phase <= 0 else min(per_phase, last - first + 1)
        points |= {first + round(i * (last - first) / max(k - 1, 1)) for i in range(k)}
    return sorted(points)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("url")
    r.add_argument("study")
    r.add_argument("--log", required=True)
    r.add_argument("--die-at", type=int, default=0)
    u = sub.add_parser("upgrade")
    u.add_argument("url")
    for s in (r, u):
        s.add_argument("--kill-at", type=int, default=0)
        s.add_argument("--phases")
    args = p.parse_args(argv)
    _state["kill_at"], _state["die_at"] = args.kill_at, getattr(args, "die_at", 0)
    if args.phases:
        _phase_file.append(Path(args.phases))
    (_run if args.cmd == "run" else _upgrade)(args)
    print(json.dumps({"statements": _state["statements"], "phases": _phases}))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
