"""PS + DFS in one command: a data-flow space names a stored parameter-space candidate (study://STUDY/N) as a
source; it is checked at validation, read from the store and materialized once into the content-addressed
cache when a worker opens it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evomerge.genomes import make_genome
from evomerge.genomes.data_flow.model import DataFlowMaterializer
from evomerge.genomes.data_flow.sources import materialize_recipe, resolve_source
from evomerge.recipe import LayerGroup, Recipe
from evomerge.space import SpaceError, load_space
from evomerge.store import Store
from evomerge.study_refs import StudyRefError, canonical_study_ref, parse_study_ref
from tests.fixtures_models import make_tiny_llama_family

ROOT = Path(__file__).resolve().parents[1]
L = 3

DFS = """
models: ["{first}", "{second}"]
genome: {{type: data_flow, repeats: 1}}
objectives:
  - {{name: path_length, kind: cost, measure: path_length, direction: minimize}}
budget: 4
{storage}
"""


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """A PS study whose candidate 1 is complete (a linear merge of the two experts) and 2 is queued."""
    root = tmp_path_factory.mktemp("psdfs")
    base, (a, b) = make_tiny_llama_family(root, 2, num_hidden_layers=L)
    ps = Recipe(base=base, sources=[a, b], method="linear", groups=[
        LayerGroup(name="all", kind="blocks", start=0, stop=L, weights=[0.7, 0.3]),
        LayerGroup(name="embed", kind="embed", weights=[0.7, 0.3]),
        LayerGroup(name="head", kind="head", weights=[0.7, 0.3]),
    ])
    db = root / "ps.db"
    store = Store(f"sqlite:///{db}")
    store.create_study("ps", "", [{"name": "a", "direction": "maximize"}], budget=2)
    for key in (0, 1):
        store.add_candidate("ps", proposal_key=key, genome=[0.5], recipe_json=ps.canonical_json(),
                            recipe_hash=ps.hash() + str(key))
    store.mark_running("ps", 1)
    store.complete_candidate("ps", 1, {"a": 0.5})
    store.close()
    return root, db, ps, b


def _space(root: Path, first: str, second: str, storage: str = "", name: str = "dfs.yaml") -> Path:
    p = root / name
    p.write_text(DFS.format(first=first, second=second, storage=storage))
    return p


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "evomerge.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_refs_parse_and_take_the_spaces_storage(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert parse_study_ref("study://demo/145").number == 145
    assert canonical_study_ref("study://demo/145", "sqlite:///x.db") == f"study://demo/145?storage=sqlite:///{tmp_path}/x.db"
    own = "study://demo/3?storage=postgresql+psycopg://u@h:5432/db"
    assert canonical_study_ref(own, "sqlite:///x.db") == own  # the ref's own storage wins
    for bad in ("study://demo", "study://demo/x", "study://demo/0", "study:///3"):
        with pytest.raises(StudyRefError):
            parse_study_ref(bad)


def test_stored_candidate_is_a_data_flow_source(stored, tmp_path: Path, monkeypatch) -> None:
    root, db, ps, b = stored
    monkeypatch.setenv("EVOMERGE_CACHE_DIR", str(tmp_path / "cache"))
    space = load_space(_space(root, "study://ps/1", b, f"storage: sqlite:///{db}"))
    ref = space.model_ref("study://ps/1")
    assert ref == f"study://ps/1?storage=sqlite:///{db}"
    genome = make_genome(space)  # block count from the PS recipe's base: nothing built at validation
    assert genome.num_layers == [L, L] and not (tmp_path / "cache").exists()
    folder = Path(resolve_source(ref))
    assert folder.name == ps.hash() and (folder / "config.json").is_file()  # content-addressed
    assert resolve_source(ref) == str(folder)  # built once: the second open finds it
    expected = materialize_recipe(ps, tmp_path / "direct")
    dm = DataFlowMaterializer.from_refs([ref, b])
    from safetensors.torch import load_file

    want = load_file(str(next(expected.glob("*.safetensors"))))
    torch.testing.assert_close(dm.sources[0].model.layers[1].mlp.up_proj.weight,
                               want["model.layers.1.mlp.up_proj.weight"], atol=0, rtol=0)
    # the recipe of a DFS candidate names the source with its storage: it rebuilds from any directory
    assert genome.decode([0.9] * genome.dim).models[0] == ref


def test_missing_study_or_candidate_is_one_line_exit_2(stored, tmp_path: Path) -> None:
    root, db, ps, b = stored
    ok = _space(root, f"study://ps/1?storage=sqlite:///{db}", b, name="ok.yaml")
    r = _cli("validate", "--space", str(ok), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    cases = {
        "nostudy": ("study://nope/1", "no study 'nope'"),
        "nocand": ("study://ps/9", "has no candidate 9"),
        "queued": ("study://ps/2", "queued, not complete"),
        "malformed": ("study://ps", "STUDY/NUMBER"),
    }
    for name, (ref, words) in cases.items():
        p = _space(root, ref, b, f"storage: sqlite:///{db}", name=f"{name}.yaml")
        with pytest.raises(SpaceError) as e:
            load_space(p)
        assert words in str(e.value) and "models.0" in str(e.value) and "\n" not in str(e.value)
        if name == "nostudy":  # the command: one line, exit 2, nothing else
            r = _cli("validate", "--space", str(p), cwd=tmp_path)
            lines = r.stderr.strip().splitlines()
            assert r.returncode == 2 and len(lines) == 1 and words in lines[0], r.stderr


def test_parameter_space_refuses_a_stored_candidate(stored) -> None:
    root, db, ps, b = stored
    p = root / "ps_space.yaml"
    p.write_text(f"base_model: {ps.base}\nmodels: [study://ps/1, {b}]\nstorage: sqlite:///{db}\n"
                 "objectives: [{name: n, kind: cost, measure: params, direction: minimize}]\n")
    with pytest.raises(SpaceError, match="data-flow searches only"):
        load_space(p)


def test_shipped_ps_dfs_space_names_the_demo_study() -> None:
    text = (ROOT / "search_spaces" / "demo_ps_dfs.yaml").read_text()
    assert "study://demo/" in text and "evomerge search --space search_spaces/demo_ps_dfs.yaml" in text
