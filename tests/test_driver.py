"""Driver logic that needs no Ray: the result cache by recipe hash, and re-proposals after a crash."""

from __future__ import annotations

from pathlib import Path

import pytest
from fixtures_models import make_tiny_llama_family

from evomerge.driver import Driver
from evomerge.search import Proposal
from evomerge.space import dump_space, load_space
from evomerge.store import Store


@pytest.fixture
def driver(tmp_path: Path) -> Driver:
    base, experts = make_tiny_llama_family(tmp_path, n_experts=2, seed=0)
    p = tmp_path / "s.yaml"
    p.write_text(f"""
base_model: {base}
models: [{experts[0]}, {experts[1]}]
genome: {{method: task_arithmetic, layer_groups: model}}
objectives:
  - {{name: a, task: t1, metric: "exact_match,none"}}
  - {{name: b, task: t2, metric: "exact_match,none"}}
algorithm: {{name: random}}
budget: 5
""")
    space = load_space(p)
    store = Store(f"sqlite:///{tmp_path / 'd.db'}")
    store.create_study("s", dump_space(space), [{"name": "a", "direction": "maximize"},
                                                {"name": "b", "direction": "maximize"}], budget=5)
    return Driver(space, store, "s", show_progress=False)


def _finish(d: Driver, scores: dict, timings: dict | None = None) -> int:
    job = d.queue.popleft()
    d.store.mark_running("s", job.number, worker="test")
    d.store.complete_candidate("s", job.number, scores, {"a": [1.0, 0.0], "b": [0.5, 0.0]}, timings or {})
    d._tell(job.key, [scores["a"], scores["b"]])
    return job.number


def _repeat_first_proposal(d: Driver, monkeypatch) -> None:
    first = d.store.get_candidate("s", 1)
    nxt = iter(range(100, 200))
    monkeypatch.setattr(d.algo, "ask", lambda n: [Proposal(key=next(nxt), x=list(first.genome))])
    monkeypatch.setattr(d.algo, "tell", lambda results: None)


def test_same_recipe_reuses_scores_without_evaluating(driver: Driver, monkeypatch) -> None:
    d = driver
    d._propose(1)
    first = _finish(d, {"a": 0.5, "b": 0.25})
    d.store.add_scores("s", first, {"held_out": 0.9})  # a report score must not travel with the cache
    _repeat_first_proposal(d, monkeypatch)
    d._propose(1)
    assert not d.queue  # nothing to evaluate
    c = d.store.get_candidate("s", 2)
    assert c.state == "complete" and c.recipe_hash == d.store.get_candidate("s", first).recipe_hash
    assert c.scores == {"a": 0.5, "b": 0.25}
    assert c.timings == {"cached_from": float(first)}
    assert d.store.sample_scores("s", 2) == {"a": [1.0, 0.0], "b": [0.5, 0.0]}


def test_multi_fidelity_stop_is_not_reused(driver: Driver, monkeypatch) -> None:
    d = driver
    d._propose(1)
    _finish(d, {"a": 0.1, "b": 0.1}, {"fidelity": 0.25, "pruned": 1.0})
    _repeat_first_proposal(d, monkeypatch)
    d._propose(1)
    assert [j.number for j in d.queue] == [2]  # evaluated in full, not copied from a slice


def test_ctrl_c_is_a_flag_then_an_interrupt():
    """The search loop's Ctrl-C: the first SIGINT only sets the flag the loop checks between candidates
    (Ray can swallow a KeyboardInterrupt raised inside ray.wait); a second interrupts at once; the
    previous handler comes back afterwards."""
    import os
    import signal

    from evomerge.driver import _ctrl_c

    before = signal.getsignal(signal.SIGINT)
    with _ctrl_c() as stop:
        assert not stop.is_set()
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(100):  # the handler runs at the next bytecode boundary
            if stop.is_set():
                break
        assert stop.is_set()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(100):
                pass
    assert signal.getsignal(signal.SIGINT) is before
