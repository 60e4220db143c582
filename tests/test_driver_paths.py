"""Driver paths end to end without Ray: multi-fidelity racing through the study loop with real
MergeWorkers (the candidates merged, the slice scored, the rest only for those that can still reach the
front), and `search` into a study that exists."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest
from fixtures_models import make_tiny_llama_family
from test_bad_input import assert_one_line_error, run_cli

from evomerge import front as frontlib
from evomerge.fidelity import MultiFidelity, optimistic_value
from evomerge.run import InProcessPool, StudyRun, worker_config
from evomerge.space import dump_space, load_space
from evomerge.store import Store
from evomerge.view import StudyView

# Per-example 0/1 scores from the merged weights: both objectives' means grow with one feature of the
# model, so candidates differ, the weak ones are dominated, and a slice of the examples estimates the whole.
SCORER = '''
import torch

def score(model, tokenizer, indices=None, args=None):
    w = model.get_input_embeddings().weight
    p = float(torch.sigmoid(w.double().sum() * 0.3 + args["shift"]))
    idx = list(indices) if indices is not None else list(range(40))
    return [1.0 if (i * 0.618034 + 0.1) % 1.0 < p else 0.0 for i in idx]
'''

SPACE = """
base_model: {base}
models: [{e0}, {e1}]
genome: {{method: task_arithmetic, layer_groups: model, weight_bounds: [-1.0, 2.0]}}
objectives:
  - {{name: a, kind: python, scorer: "scorer.py:score", args: {{shift: 0.0}}, bounded: true, limit: 40}}
  - {{name: b, kind: python, scorer: "scorer.py:score", args: {{shift: -1.0}}, bounded: true, limit: 40}}
algorithm: {{name: random}}
evaluation: {{multi_fidelity: {{fraction: 0.25, bound: hoeffding, delta: 0.2}}}}
budget: 14
seed: 2
"""


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> tuple[Path, list[Path]]:
    from evomerge.zoo.modeling import make_tokenizer  # a worker loads the base's tokenizer

    base, experts = make_tiny_llama_family(tmp_path_factory.mktemp("fam"), n_experts=2, seed=0,
                                           tie_word_embeddings=False, scale=0.2)
    make_tokenizer().save_pretrained(base)
    return base, experts


def test_multi_fidelity_through_the_driver(tmp_path: Path, family, one_torch_thread) -> None:
    base, experts = family
    (tmp_path / "scorer.py").write_text(SCORER)
    p = tmp_path / "s.yaml"
    p.write_text(SPACE.format(base=base, e0=experts[0], e1=experts[1]))
    space = load_space(p)
    store = Store(f"sqlite:///{tmp_path / 'd.db'}")
    store.create_study("s", dump_space(space), [{"name": "a", "direction": "maximize"},
                                                {"name": "b", "direction": "maximize"}], budget=space.budget)
    StudyRun(space, store, "s", show_progress=False,
             pool=lambda cfg: InProcessPool.from_config(worker_config(space), workers=2)).run()

    assert store.get_study("s").status == "done"
    cands = store.candidates("s")
    assert len(cands) == 14 and {c.state for c in cands} == {"complete"}
    pruned = [c for c in cands if (c.timings or {}).get("pruned")]
    full = [c for c in cands if not (c.timings or {}).get("pruned")]
    assert pruned and full, "the race stopped no candidate, or every one"
    fid = MultiFidelity(fraction=0.25, bound="hoeffding", delta=0.2)
    F = np.array([[c.scores["a"], c.scores["b"]] for c in full])
    for c in pruned:
        samples = store.sample_scores("s", c.number)
        assert c.timings["fidelity"] == 0.25 and {len(v) for v in samples.values()} == {10}  # the slice only
        # stopped because even its best reachable scores were dominated by a fully scored candidate
        best = [optimistic_value(samples[n], 40, "maximize", fid) for n in ("a", "b")]
        assert np.any(np.all(F >= best, axis=1) & np.any(F > best, axis=1)), (c.number, best)
    for c in full:
        assert {len(v) for v in store.sample_scores("s", c.number).values()} == {40}
    front = {c.number for c in StudyView(store).front("s")}
    assert front and not front & {c.number for c in pruned}  # slice scores never reach the front
    nd = frontlib.non_dominated(frontlib.to_minimization(F, ["maximize", "maximize"]))
    assert front == {full[i].number for i in np.flatnonzero(nd)}
    scored = sum(len(v) for c in cands for v in store.sample_scores("s", c.number).values())
    assert scored < 14 * 2 * 40  # the race saved examples


def test_search_into_an_existing_study_is_refused(tmp_path: Path, family) -> None:
    base, experts = family
    p = tmp_path / "s.yaml"
    p.write_text(f"""
base_model: {base}
models: [{experts[0]}, {experts[1]}]
genome: {{method: task_arithmetic, layer_groups: model}}
objectives: [{{name: size, kind: cost, measure: params, direction: minimize}}]
budget: 3
""")
    db = tmp_path / "d.db"
    with Store(f"sqlite:///{db}") as store:
        store.create_study("taken", "x: 1", [{"name": "size", "direction": "minimize"}], budget=3)
    r = run_cli(["search", "--space", str(p), "--study", "taken", "--storage", f"sqlite:///{db}", "--no-progress"],
                tmp_path)
    assert_one_line_error(r)
    assert "'taken' exists" in r.stderr and "evomerge resume taken" in r.stderr
    with sqlite3.connect(db) as con:
        assert con.execute("select count(*) from studies").fetchone()[0] == 1
        assert con.execute("select count(*) from candidates").fetchone()[0] == 0


def test_min_gain_through_the_driver(tmp_path: Path, family, one_torch_thread) -> None:
    base, experts = family
    (tmp_path / "scorer.py").write_text(SCORER)
    p = tmp_path / "s.yaml"
    text = SPACE.format(base=base, e0=experts[0], e1=experts[1])
    p.write_text(text.replace("delta: 0.2", "delta: 0.2, min_gain: 0.2"))
    space = load_space(p)
    store = Store(f"sqlite:///{tmp_path / 'd.db'}")
    store.create_study("s", dump_space(space), [{"name": "a", "direction": "maximize"},
                                                {"name": "b", "direction": "maximize"}], budget=space.budget)
    run = StudyRun(space, store, "s", show_progress=False,
                   pool=lambda cfg: InProcessPool.from_config(worker_config(space), workers=2))
    run.run()
    assert store.get_study("s").status == "done"
    _, args = run._fidelity_args()
    assert args["min_gain"] == 0.2 and args["reference"] == store.get_study("s").reference_point
    cands = store.candidates("s")
    full = [c for c in cands if not (c.timings or {}).get("pruned")]
    F = np.array([[c.scores["a"], c.scores["b"]] for c in full])
    fid = space.evaluation.multi_fidelity
    # a stopped candidate that no fully scored one dominates was not dominated when it was sent out either
    # (the front then is dominated by the final one): only the gain rule can have stopped it
    by_gain = []
    for c in cands:
        if (c.timings or {}).get("pruned"):
            samples = store.sample_scores("s", c.number)
            best = np.array([optimistic_value(samples[n], 40, "maximize", fid) for n in ("a", "b")])
            if not np.any(np.all(F >= best, axis=1) & np.any(F > best, axis=1)):
                by_gain.append(c.number)
    assert by_gain, "min_gain stopped no candidate that dominance alone would have finished"
    front = {c.number for c in StudyView(store).front("s")}
    assert front and front <= {c.number for c in full}
