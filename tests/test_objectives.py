"""Every objective kind of the registry (config, one-line errors, evaluation on a tiny model, declared flags),
and the python kind end to end on a worker over the demo zoo."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


from evomerge.genomes import cost_measure  # noqa: E402
from evomerge.genomes.base import nonzero_params as count_nonzero_params  # noqa: E402
from evomerge.objectives import (  # noqa: E402
    KINDS,
    EvaluationError,
    Evaluator,
    Objective,
    is_bounded,
    parse_objective,
    supports_fidelity,
)
from evomerge.space import SpaceError, dump_space, load_space, parse_space_text  # noqa: E402
from tests.test_evaluate import LOWER, TASKS, char_tokenizer, make_bigram, tiny_llama  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
ROOT = Path(__file__).resolve().parents[1]
DEMO_TASKS = ROOT / "search_spaces" / "demo_tasks"
SCORER = f"{FIXTURES / 'scorers.py'}:greedy_exact_match"


def letters_args(task: str = "letters") -> dict[str, Any]:
    return {"data": str(TASKS / "data" / f"{task}.jsonl"), "prompt": "q", "target": "a", "max_new_tokens": 4}


@dataclass
class Case:
    entry: dict[str, Any]  # a valid space entry
    bad: tuple[dict[str, Any], str]  # an invalid one, and the field its error must name
    bounded: bool
    fidelity: bool  # multi-fidelity can slice it
    per_example: bool  # its value is a mean of per-example scores


CASES = {
    "lm_eval": Case(
        {"name": "letters", "task": "evomerge_test_letters", "metric": "exact_match,none", "limit": 6},
        ({"name": "x", "task": "evomerge_test_letters"}, "metric"),
        bounded=True,
        fidelity=True,
        per_example=True,
    ),
    "cost": Case(
        {"name": "size", "kind": "cost", "measure": "params", "direction": "minimize"},
        ({"name": "x", "kind": "cost", "measure": "flops"}, "measure"),
        bounded=False,
        fidelity=False,
        per_example=False,
    ),
    "python": Case(
        {"name": "py", "kind": "python", "scorer": SCORER, "args": letters_args(), "limit": 6, "bounded": True},
        ({"name": "x", "kind": "python", "scorer": "no_function_named"}, "scorer"),
        bounded=True,
        fidelity=True,
        per_example=True,
    ),
}
KIND_NAMES = sorted(KINDS)


def write_space(tmp_path: Path, objectives: list[dict], **evaluation: Any) -> Path:
    p = tmp_path / "s.yaml"
    # hub ids and the test tasks: a loaded space's models and tasks are checked on disk
    evaluation.setdefault("task_paths", [str(TASKS)])
    space = {"base_model": "org/b", "models": ["org/a"], "objectives": objectives, "evaluation": evaluation}
    p.write_text(yaml.safe_dump(space))
    return p


# Tiny matrices: extra threads only contend with the other processes on a small machine.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def solved():
    model = tiny_llama()
    make_bigram(model, LOWER)  # answers every "lower X" right
    return model


def test_specs_load_without_torch_or_lm_eval() -> None:
    # The CLI validates spaces through the kinds' models: those must not pull the evaluators' libraries.
    code = (
        "import sys, evomerge.objectives, evomerge.space\n"
        "print(sorted(m for m in ('torch', 'lm_eval', 'datasets', 'transformers') if m in sys.modules))"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "[]", p.stdout + p.stderr


def test_every_kind_has_a_case() -> None:
    assert set(KINDS) == set(CASES) and {"lm_eval", "cost", "python"} <= set(KINDS)


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_config_validates_as_its_kind(kind: str, tmp_path: Path) -> None:
    case = CASES[kind]
    space = load_space(write_space(tmp_path, [case.entry]))
    (o,) = space.objectives
    assert type(o) is KINDS[kind] and isinstance(o, Objective) and o.kind == kind
    assert type(Objective(**case.entry)) is type(Objective.model_validate(case.entry)) is KINDS[kind]
    assert parse_objective(o.model_dump()) == o
    again = parse_space_text(dump_space(space))  # what a study stores and reads back
    assert again.objectives == space.objectives


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_bad_config_is_one_line_naming_the_field(kind: str, tmp_path: Path) -> None:
    entry, field = CASES[kind].bad
    with pytest.raises(SpaceError) as e:
        load_space(write_space(tmp_path, [CASES["lm_eval"].entry | {"name": "ok"}, entry]))
    msg = str(e.value)
    assert "\n" not in msg and f"field 'objectives.1.{field}'" in msg, msg


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_declared_flags(kind: str, tmp_path: Path) -> None:
    case = CASES[kind]
    o = parse_objective(case.entry)
    assert is_bounded(o) is case.bounded and supports_fidelity(o) is case.fidelity
    # A multi-fidelity search takes an objective it can slice, or one without examples (computed exactly).
    p = write_space(tmp_path, [case.entry], multi_fidelity={"fraction": 0.5})
    if case.fidelity or not case.per_example:
        load_space(p)
    else:
        with pytest.raises(SpaceError, match=f"multi_fidelity.*objective '{o.name}'"):
            load_space(p)


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_evaluates_on_a_tiny_model(kind: str, tok, solved, tmp_path: Path) -> None:
    o = parse_objective(CASES[kind].entry)
    ev = Evaluator([o], [str(TASKS)], tok, batch_size=8, cache_dir=str(tmp_path / "c"), measure=cost_measure)
    for model in (solved, tiny_llama(seed=1)):
        r = ev.evaluate(model)[o.name]
        if CASES[kind].per_example:
            assert len(r.samples) == o.limit and r.value == pytest.approx(sum(r.samples) / len(r.samples))
            assert all(0.0 <= s <= 1.0 for s in r.samples)
            assert (r.value == 1.0) is (model is solved)
            assert ev.num_docs(o) == o.limit
            part = ev.evaluate(model, [o], window=(2, 4))[o.name]
            assert part.samples == r.samples[2:4]
        else:
            assert r.samples == [] and r.value == count_nonzero_params(model)


def test_python_scores_like_lm_eval(tok, solved, tmp_path: Path) -> None:
    lm = parse_objective({"name": "lm", "task": "evomerge_test_mixed", "metric": "exact_match,none"})
    py = parse_objective({"name": "py", "kind": "python", "scorer": SCORER, "args": letters_args("mixed")})
    ev = Evaluator([lm, py], [str(TASKS)], tok, batch_size=8, cache_dir=str(tmp_path / "c"))
    for model in (solved, tiny_llama(seed=2)):
        res = ev.evaluate(model)
        assert res["py"] == res["lm"]
    assert res["py"].samples and solved.training is False


def test_python_scorer_errors(tok, tmp_path: Path) -> None:
    def run(**fields: Any) -> None:
        o = parse_objective({"name": "x", "kind": "python", **fields})
        Evaluator([o], [], tok, batch_size=1).evaluate(tiny_llama())

    const = "tests.fixtures.scorers:constant"  # the module:function form
    run(scorer=const, args={"value": 0.5})
    with pytest.raises(EvaluationError, match="returned 2 scores for 3 examples"):
        run(scorer=f"{FIXTURES / 'scorers.py'}:constant", args={"value": 1.0, "n": 2, "ignore_indices": True}, limit=3)
    with pytest.raises(EvaluationError, match="bounded but its scorer returned a score outside"):
        run(scorer=const, args={"value": 2.0}, bounded=True)
    with pytest.raises(EvaluationError, match="no file"):
        run(scorer="missing.py:f")
    with pytest.raises(EvaluationError, match="cannot import"):
        run(scorer="no_such_module_here:f")
    with pytest.raises(EvaluationError, match="has no function nope"):
        run(scorer="tests.fixtures.scorers:nope")


def test_no_lm_eval_evaluator_without_lm_eval_objectives(tok) -> None:
    py = parse_objective({"name": "x", "kind": "python", "scorer": "tests.fixtures.scorers:constant"})
    ev = Evaluator([py], [], tok, batch_size=1, measure=lambda model, name: 7.0)
    cost = parse_objective({"name": "c", "kind": "cost", "measure": "path_length"})
    assert ev.evaluate(tiny_llama(), [cost])["c"].value == 7.0  # the worker's measure, whatever the name
    assert set(ev._kinds) == {"python", "cost"}


# ------------------------------------------------------------------------------------ end to end on a worker


@pytest.fixture(scope="module")
def worker_space(tmp_path_factory, short_zoo):
    """A space beside its scorer file: a python objective and the lm-eval task on the same data."""
    d = tmp_path_factory.mktemp("space")
    zoo = short_zoo
    shutil.copy(FIXTURES / "scorers.py", d / "my_scorers.py")
    data = DEMO_TASKS / "data" / "arith_search.jsonl"
    p = d / "s.yaml"
    p.write_text(f"""
base_model: {zoo / "base"}
models: [{zoo / "arith"}, {zoo / "script"}]
genome: {{method: task_arithmetic, layer_groups: model}}
objectives:
  - {{name: arith, task: demo_arith_search, metric: "exact_match,none", limit: 16}}
  - name: arith_py
    kind: python
    scorer: my_scorers.py:greedy_exact_match
    args: {{data: {data}, max_new_tokens: 8}}
    limit: 16
    bounded: true
  - {{name: size, kind: cost, measure: params, direction: minimize}}
evaluation: {{batch_size: 16, task_paths: [{DEMO_TASKS}], multi_fidelity: {{fraction: 0.25, bound: safe}}}}
""")
    return load_space(p)


def test_python_objective_on_a_worker(worker_space, tmp_path: Path, monkeypatch) -> None:
    from evomerge.genomes import make_genome
    from evomerge.run import worker_config
    from evomerge.workers import MergeWorker

    monkeypatch.chdir(tmp_path)  # the scorer file resolves against the space file, not the cwd
    w = MergeWorker(worker_config(worker_space))
    recipe = make_genome(worker_space).decode([0.5, 0.5]).canonical_json()
    full = w.evaluate(1, recipe)
    assert not full["error"], full["error"]
    py, lm = full["samples"]["arith_py"], full["samples"]["arith"]
    assert len(py) == 16 and py == lm and full["scores"]["arith_py"] == pytest.approx(sum(py) / 16)
    assert full["samples"]["size"] == [] and full["scores"]["size"] > 0

    fid = {"fraction": 0.25, "bound": "safe"}
    finished = w.evaluate(2, recipe, front=[[0.0, 0.0, 1e12]], fidelity=fid)
    assert finished["timings"]["fidelity"] == 1.0 and finished["samples"] == full["samples"]
    # A front member perfect on both and of size 0 dominates even a perfect first slice: stop after it.
    stopped = w.evaluate(3, recipe, front=[[1.0, 1.0, 0.0]], fidelity=fid)
    assert stopped["timings"]["pruned"] == 1.0 and stopped["samples"]["arith_py"] == py[:4]
    assert stopped["scores"]["arith_py"] == pytest.approx(sum(py[:4]) / 4)
