"""One suite over the operator registry: every registered operator is searchable (its genes decode
inside their bounds and the merge runs), exports to mergekit where it has a mergekit name, and survives
a mergekit round trip where expressible; old spaces decode exactly as before the registry drove it."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import yaml
from mergekit.config import MergeConfiguration

from evomerge.genomes.parameter_space.genome import ParameterSpaceGenome, plan_groups
from evomerge.merge import Materializer, kernels
from evomerge.merge.build import build_state_dict
from evomerge.merge.mergekit_export import dump_mergekit_yaml, recipe_to_mergekit
from evomerge.merge.mergekit_io import mergekit_to_recipe
from evomerge.merge.mergekit_settings import takes_slices
from evomerge.merge.operators import KERNELS, OPERATORS, get_operator, resolve_params
from evomerge.recipe import LayerGroup, Recipe
from evomerge.space import SearchSpace, SpaceError, load_space

try:
    from fixtures_models import make_tiny_llama_family
except ImportError:  # tests/ collected as a package
    from tests.fixtures_models import make_tiny_llama_family

ALL = sorted(OPERATORS)
SEARCHABLE = [n for n in ALL if not OPERATORS[n].needs_data()]
WITH_MERGEKIT = [n for n in ALL if OPERATORS[n].mergekit_method is not None]
N_LAYERS = 2
K = 2  # every operator takes two sources (SLERP at most two, Model Stock at least two)
WB, DB = (-0.5, 1.5), (0.2, 1.0)
COST = [{"name": "size", "kind": "cost", "measure": "params"}]


def space(method: str, models: list[str], base: str = "base", **genome) -> SearchSpace:
    g = {"method": method, "layer_groups": 1, "num_layers": N_LAYERS, "weight_bounds": list(WB),
         "density_bounds": list(DB), **genome}  # fmt: skip
    return SearchSpace.model_validate({"base_model": base, "models": models, "genome": g, "objectives": COST})


def points(dim: int, seed: int = 0) -> list[list[float]]:
    rng = random.Random(seed)
    return [[0.0] * dim, [1.0] * dim, [rng.random() for _ in range(dim)], [rng.uniform(-0.5, 1.5) for _ in range(dim)]]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("registry")
    base, experts = make_tiny_llama_family(
        root, n_experts=K, seed=0, tie_word_embeddings=False, num_hidden_layers=N_LAYERS
    )
    return str(base), [str(e) for e in experts]


@pytest.fixture(scope="module")
def mat(family):
    base, experts = family
    return Materializer(base, experts)


# --------------------------------------------------------------------------------------------------
# the spec


@pytest.mark.parametrize("name", ALL)
def test_spec_is_consistent(name):
    spec = OPERATORS[name]
    assert set(spec.param_bounds) <= set(spec.group_params) <= set(spec.params)
    for p in spec.param_bounds:
        lo, hi = spec.bounds(p, K)
        assert lo < hi
        assert spec.decode_param(p, 0.0, K) == lo and spec.decode_param(p, 1.0, K) == hi
    if spec.fused is not None:
        w, dens = torch.tensor([0.3, 0.7]), torch.tensor([0.5, 1.0])
        for drawn in (False, True):
            p = spec.fused(resolve_params(spec, None), w, dens, drawn)
            assert p is None or p.kernel in KERNELS
    if spec.mergekit_defaults is not None:
        assert spec.mergekit_method is not None


def test_fused_operators_are_the_ones_the_kernels_had():
    assert set(kernels.fused_operators()) == {
        "linear", "task_arithmetic", "ties", "dare", "dare_ties", "della", "della_linear",
    }  # fmt: skip


def test_integer_params_decode_to_integers():
    spec = get_operator("consensus")
    values = [spec.decode_param("k", u / 100, 3) for u in range(101)]
    assert all(isinstance(v, int) for v in values) and sorted(set(values)) == [0, 1, 2, 3]


# --------------------------------------------------------------------------------------------------
# searchable: genes decode inside their bounds, validation refuses what cannot be searched


@pytest.mark.parametrize("name", SEARCHABLE)
def test_genes_decode_inside_bounds(name):
    spec = OPERATORS[name]
    g = ParameterSpaceGenome(space(name, [f"m{i}" for i in range(K)], layer_groups=2), num_layers=4)
    names = g.gene_names()
    assert len(names) == len(set(names)) == g.dim == len(g.groups) * g.genes_per_group
    for x in points(g.dim):
        r = g.decode(x)
        assert r.method == name and len(r.groups) == len(plan_groups(4, 2))
        for grp in r.groups:
            assert len(grp.weights) == K
            if "weight" in spec.source_genes:
                assert all(WB[0] <= w <= WB[1] for w in grp.weights)
            assert (grp.densities is not None) == ("density" in spec.source_genes)
            if grp.densities is not None:
                assert all(DB[0] <= d <= DB[1] for d in grp.densities)
            gp = grp.params or {}
            assert set(gp) == set(spec.param_bounds)
            for p, v in gp.items():
                lo, hi = spec.bounds(p, K)
                assert lo <= v <= hi
                assert isinstance(v, int) == (isinstance(lo, int) and isinstance(hi, int))
            resolve_params(spec, r.params_for(grp))  # the recipe's params are the operator's


def test_a_fixed_group_param_is_not_searched():
    g = ParameterSpaceGenome(space("slerp", ["a", "b"], params={"t": 0.25}))
    assert g.dim == 0 and g.decode([]).params_for(g.decode([]).groups[0]) == {"t": 0.25}


def _load(tmp_path: Path, **fields) -> SearchSpace:
    for m in ("base", "a", "b", "c"):  # a loaded space's model folders are checked
        (tmp_path / m).mkdir(exist_ok=True)
        (tmp_path / m / "config.json").write_text('{"model_type": "llama", "num_hidden_layers": 2}')
    data = {"base_model": "base", "models": ["a", "b"], "objectives": COST, **fields}
    p = tmp_path / "space.yaml"
    p.write_text(yaml.safe_dump(data))
    return load_space(p)


@pytest.mark.parametrize(
    "genome,field,words",
    [
        ({"method": "magic"}, "genome.method", ["unknown merge method 'magic'", "sce", "ties"]),
        ({"method": "fisher"}, "genome.method", ["'fisher' needs", "Fisher"]),
        ({"method": "lines", "params": {"base_method": "fisher"}}, "genome.params", ["needs", "Fisher"]),
    ],
)
def test_space_refuses_with_one_line(tmp_path, genome, field, words):
    with pytest.raises(SpaceError) as e:
        _load(tmp_path, genome=genome)
    msg = str(e.value)
    assert "\n" not in msg and f"field '{field}'" in msg
    assert all(w in msg for w in words), msg


def test_space_checks_source_counts(tmp_path):
    with pytest.raises(SpaceError, match="genome.method: method 'slerp' takes at least 1 and at most 2"):
        _load(tmp_path, models=["a", "b", "c"], genome={"method": "slerp"})
    with pytest.raises(SpaceError, match="model_stock"):
        _load(tmp_path, models=["a"], genome={"method": "model_stock"})
    assert _load(tmp_path, genome={"method": "sce"}).genome.method == "sce"


# --------------------------------------------------------------------------------------------------
# a decoded genome merges


@pytest.mark.parametrize("name", SEARCHABLE)
def test_decoded_genome_merges(name, family, mat):
    base, experts = family
    g = ParameterSpaceGenome(space(name, experts, base=base, layer_groups="block"))
    recipe = g.decode(points(g.dim, seed=1)[2])
    out = mat.merged_state_dict(recipe)
    assert set(out) == set(mat.base)
    for key, t in out.items():
        assert t.shape == mat.base[key].shape and t.dtype == mat.base[key].dtype, key
        assert torch.isfinite(t).all(), key
    assert any(not torch.equal(t, mat.base[key]) for key, t in out.items())
    model = mat.new_model()  # a worker's path: in place, the C batch or streamed chunks
    mat.apply(recipe, model)
    state = model.state_dict()
    for key, t in out.items():
        torch.testing.assert_close(state[key], t, rtol=0, atol=1e-6, msg=key)


# --------------------------------------------------------------------------------------------------
# mergekit: export, and the round trip recipe -> mergekit config -> recipe


def _exportable_recipe(name: str, family) -> Recipe:
    base, experts = family
    spec = OPERATORS[name]
    g = ParameterSpaceGenome(space(name, experts, base=base, layer_groups="block"))
    recipe = g.decode(points(g.dim, seed=2)[2])
    if spec.sparsify in ("random", "della"):  # evomerge's 1/p rescale is not mergekit's: no drop
        recipe = recipe.model_copy(update={"groups": [
            grp.model_copy(update={"densities": [1.0] * K}) for grp in recipe.groups
        ]})  # fmt: skip
    if takes_slices(spec):  # mergekit's first slice gives the embeddings, its last the head: same models here
        gs = recipe.groups
        src = {"embed": gs[1].params["source"], "head": gs[-2].params["source"]}
        recipe = recipe.model_copy(update={"groups": [
            g.model_copy(update={"params": {**g.params, "source": src[g.kind]}}) if g.kind in src else g for g in gs
        ]})  # fmt: skip
    return recipe


@pytest.mark.parametrize("name", WITH_MERGEKIT)
def test_exports_to_mergekit_yaml(name, family):
    cfg = recipe_to_mergekit(_exportable_recipe(name, family))
    assert cfg is not None and cfg["merge_method"] == OPERATORS[name].mergekit_method
    MergeConfiguration.model_validate(yaml.safe_load(dump_mergekit_yaml(cfg)))  # mergekit's own schema


@pytest.mark.parametrize("name", WITH_MERGEKIT)
def test_mergekit_round_trip(name, family, mat):
    recipe = _exportable_recipe(name, family)
    cfg = recipe_to_mergekit(recipe)
    assert cfg is not None
    back = mergekit_to_recipe(cfg).recipe
    spec = OPERATORS[name]
    assert get_operator(back.method).name == name
    ours = mat.merged_state_dict(recipe)
    if spec.mergekit_models is not None:  # mergekit names its own origin (SLERP of two, passthrough's slices)
        theirs, _ = build_state_dict(back)
        for key, t in ours.items():
            torch.testing.assert_close(theirs[key], t, rtol=0, atol=1e-6)
        return
    assert back.sources == recipe.sources and back.slices is None
    for key in mat.base:
        a, b = recipe.group_for(key), back.group_for(key)
        if "weight" in spec.source_genes:
            assert b.weights == pytest.approx(a.weights), key
        pa, pb = resolve_params(spec, recipe.params_for(a)), resolve_params(spec, back.params_for(b))
        for p in spec.group_params:
            assert pb[p] == pytest.approx(pa[p]), (key, p)
    theirs = mat.merged_state_dict(back)
    for key, t in ours.items():
        torch.testing.assert_close(theirs[key], t, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", [n for n in WITH_MERGEKIT if "density" in OPERATORS[n].source_genes])
def test_a_drop_exports_as_the_spec_says(name, family, mat):
    """Densities below 1: an exact sparsification round-trips, DARE's masks export in distribution (a
    note says so), DELLA's do not export (mergekit ranks |tau| per row, evomerge per tensor)."""
    spec = OPERATORS[name]
    recipe = _exportable_recipe(name, family)
    recipe = recipe.model_copy(update={
        "groups": [g.model_copy(update={"densities": [0.5, 0.7]}) for g in recipe.groups],
        "params": {**recipe.params, **({"rescale": "l1"} if spec.mergekit_rescale else {})},
    })  # fmt: skip
    notes: list[str] = []
    cfg = recipe_to_mergekit(recipe, notes=notes)
    assert (cfg is None) == (spec.mergekit_drop == "none")
    assert bool(notes) == (spec.mergekit_drop == "distribution")
    if spec.mergekit_rescale:  # evomerge's default 1/p rescale has no mergekit counterpart when dropping
        inverse = recipe.model_copy(update={"params": {**recipe.params, "rescale": "inverse"}})
        assert recipe_to_mergekit(inverse) is None
    if spec.mergekit_drop == "exact":
        back = mergekit_to_recipe(cfg).recipe
        ours, theirs = mat.merged_state_dict(recipe), mat.merged_state_dict(back)
        for key, t in ours.items():
            torch.testing.assert_close(theirs[key], t, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# old spaces decode as they did when the space listed five methods and a density set of three


def _old_decode(space_: SearchSpace, num_layers: int, x: list[float]) -> Recipe:
    """The parameter-space decoding before the operator registry drove it (a stored study's genes)."""
    gs = space_.genome
    dens_genes = gs.method in {"ties", "dare", "dare_ties"}
    it = iter(min(1.0, max(0.0, float(v))) for v in x)
    groups = []
    for p in plan_groups(num_layers, gs.layer_groups):
        w, d = [], []
        for _ in space_.models:
            w.append(gs.weight_bounds[0] + (gs.weight_bounds[1] - gs.weight_bounds[0]) * next(it))
            if dens_genes:
                d.append(gs.density_bounds[0] + (gs.density_bounds[1] - gs.density_bounds[0]) * next(it))
        groups.append(LayerGroup(name=p.name, kind=p.kind, start=p.start, stop=p.stop, weights=w, densities=d or None))
    return Recipe(base=space_.model_ref(space_.base_model), sources=[space_.model_ref(m) for m in space_.models],
                  method=gs.method, params=dict(gs.params), groups=groups, seed=space_.seed)  # fmt: skip


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "dare", "dare_ties"])
@pytest.mark.parametrize("layer_groups", [1, 3, "block", "model"])
def test_old_spaces_decode_exactly_as_before(method, layer_groups):
    sp = space(method, ["m0", "m1", "m2"], layer_groups=layer_groups, num_layers=6, params={"lambda": 1.3})
    g = ParameterSpaceGenome(sp)
    per = 2 if method in ("ties", "dare", "dare_ties") else 1
    assert g.dim == len(plan_groups(6, layer_groups)) * 3 * per
    for x in points(g.dim, seed=3):
        assert g.decode(x).canonical_json() == _old_decode(sp, 6, x).canonical_json()
