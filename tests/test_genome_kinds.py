"""Every registered genome kind, through the same steps: a space, random genes decoded into a recipe, the
candidate materialized in memory on the demo zoo's models, exported, and the exported folder reloaded by
transformers computing exactly the logits (and the costs) of the in-memory candidate."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402

import evomerge.genomes as genomes  # noqa: E402
from evomerge.genomes import (  # noqa: E402
    DEFAULT_KIND,
    KINDS,
    ExportCard,
    cost_measure,
    describe_genome,
    export_recipe,
    get_kind,
    make_genome,
    materializer,
    recipe_from_json,
    recipe_summary,
)
from evomerge.space import load_space  # noqa: E402

# One space per kind, over the zoo's folders ({zoo}); a new kind adds its line here.
SPACES = {
    "parameter_space": """
base_model: {zoo}/base
models: [{zoo}/arith, {zoo}/script]
genome: {{type: parameter_space, method: dare_ties, layer_groups: 2}}
""",
    "data_flow": """
models: [{zoo}/arith, {zoo}/script]
genome: {{type: data_flow, repeats: 2, scales: per_source_layer, embed_source: 1, head_source: 0}}
""",
}
OBJECTIVES = "objectives: [{name: size, kind: cost, measure: params, direction: minimize}]\n"


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    from evomerge.zoo import build_zoo

    # The real zoo pipeline, trained briefly: real tokenizers and Llama folders, weak models.
    return build_zoo(tmp_path_factory.mktemp("zoo"), steps_scale=0.005, log=lambda m: None)


def test_every_kind_is_registered_and_has_a_space() -> None:
    found = {
        m.name for m in pkgutil.iter_modules(genomes.__path__) if m.ispkg
        and hasattr(importlib.import_module(f"evomerge.genomes.{m.name}"), "KIND")
    }
    assert found == set(KINDS) == set(SPACES)
    assert DEFAULT_KIND in KINDS
    for name, kind in KINDS.items():
        assert kind.spec().type == name  # the spec's tag is the kind's name
    with pytest.raises(ValueError, match="unknown genome kind"):
        get_kind("no_such_kind")


@pytest.mark.parametrize("name", sorted(KINDS))
def test_kind_imports_light(name: str) -> None:
    code = (f"import sys, evomerge.genomes, evomerge.genomes.{name}\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"


def test_old_spaces_and_recipes_are_parameter_space(tmp_path: Path) -> None:
    space = tmp_path / "old.yaml"
    space.write_text("base_model: org/a\nmodels: [org/b]\ngenome: {method: linear, num_layers: 2}\n" + OBJECTIVES)
    assert load_space(space).genome.type == "parameter_space"
    old = '{"base": "a", "sources": ["b"], "method": "linear", "groups": [{"name": "all", "kind": "all", ' \
          '"weights": [1.0]}]}'
    assert recipe_from_json(old).kind == "parameter_space"


def _space(zoo: Path, tmp_path: Path, name: str):
    p = tmp_path / f"{name}.yaml"
    p.write_text(SPACES[name].format(zoo=zoo) + OBJECTIVES)
    return load_space(p)


@pytest.mark.parametrize("name", sorted(KINDS))
def test_decode_materialize_export_reload(name: str, zoo: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    space = _space(zoo, tmp_path, name)
    kind = get_kind(name)
    assert isinstance(space.genome, kind.spec)
    genome = make_genome(space)
    assert genome.kind == name and len(genome.gene_names()) == genome.dim == len(set(genome.gene_names()))
    assert describe_genome(genome)
    x = torch.rand(genome.dim, generator=torch.Generator().manual_seed(7)).tolist()
    recipe = genome.decode(x)
    assert isinstance(recipe, kind.recipe) and recipe.kind == name
    again = recipe_from_json(recipe.canonical_json())
    assert type(again) is type(recipe) and again.hash() == recipe.hash()
    assert recipe_summary(recipe)

    # The worker's path, with eager merging: the exporter merges eagerly too, so the two agree bit for bit.
    cfg = SimpleNamespace(
        base=space.model_ref(space.base_model) if space.base_model else None,
        sources=[space.model_ref(m) for m in space.models],
        fused="off",
        genome=space.genome.model_dump(mode="json"),
    )
    built = materializer(name, cfg, "cpu", torch.float32)
    model = built.materializer.new_model()
    built.materializer.apply(recipe, model)

    card = ExportCard("kinds", 3, {"size": 1.0}, [{"name": "size", "direction": "minimize"}])
    out = export_recipe(recipe, tmp_path / "out", card)
    readme = (out / "README.md").read_text()
    assert "kinds / candidate 3" in readme and recipe.hash() in readme
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.get_vocab() == AutoTokenizer.from_pretrained(built.tokenizer_path).get_vocab()
    loaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()

    ids = tok(["12+34=", "ab"], return_tensors="pt", padding=True)
    with torch.no_grad():
        want = model(**ids).logits
        got = loaded(**ids).logits
    assert torch.equal(got, want)
    for measure in kind.cost_measures:
        assert cost_measure(loaded, measure) == cost_measure(model, measure), measure
