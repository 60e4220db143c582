"""evomerge's materializer against mergekit 0.1.5 (the reference oracle), on tiny random Llamas.

Deterministic methods (linear, task_arithmetic, ties, and DARE at density 1) must agree tensor by
tensor to ATOL (float32 round-off of a different summation order). DARE at density < 1 draws its masks
from a different RNG than mergekit, so it is compared in distribution: kept fraction and norms.
"""

from __future__ import annotations

import math

import pytest
import torch

from evomerge.merge import Materializer, load_state_dict
from evomerge.merge.build import build_state_dict
from evomerge.merge.mergekit_export import recipe_to_mergekit
from evomerge.merge.mergekit_io import mergekit_to_recipe
from evomerge.recipe import LayerGroup, Recipe

try:
    from fixtures_models import make_tiny_llama_family
except ImportError:  # tests/ collected as a package
    from tests.fixtures_models import make_tiny_llama_family

from mergekit.config import MergeConfiguration  # noqa: E402
from mergekit.merge import MergeOptions, run_merge  # noqa: E402

ATOL = 2e-6  # absolute, on float32 weights of magnitude <= ~1
N_LAYERS = 3


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    base, experts = make_tiny_llama_family(
        root, n_experts=2, seed=0, tie_word_embeddings=False, num_hidden_layers=N_LAYERS
    )
    return root, base, experts


_BASES: list[dict[str, torch.Tensor]] = []


@pytest.fixture(scope="module")
def mat(family):
    _, base, experts = family
    m = Materializer(base, experts)
    _BASES[:] = [m.base]
    return m


def run_mergekit(root, name: str, cfg: dict) -> dict[str, torch.Tensor]:
    out = root / f"mk_{name}"
    conf = MergeConfiguration.model_validate({"dtype": "float32", **cfg})
    run_merge(conf, str(out), MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, random_seed=0))
    return load_state_dict(out)


def uniform_recipe(base, experts, method, weights, densities=None, params=None, seed=0) -> Recipe:
    return Recipe(
        base=base,
        sources=experts,
        method=method,
        params=params or {},
        seed=seed,
        groups=[
            LayerGroup(name="embed", kind="embed", weights=weights, densities=densities),
            LayerGroup(name="blocks", kind="blocks", start=0, stop=N_LAYERS, weights=weights, densities=densities),
            LayerGroup(name="head", kind="head", weights=weights, densities=densities),
        ],
    )


def assert_close(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], atol=ATOL):
    assert set(ours) <= set(theirs), set(ours) - set(theirs)
    # the merge moved the weights (a comparison of two copies of the base would prove nothing)
    assert any((theirs[k].float() - v.float()).abs().max() > 1e-3 for k, v in _BASES[0].items())
    worst = 0.0
    for k, v in ours.items():
        diff = (v.float() - theirs[k].float()).abs().max().item()
        worst = max(worst, diff)
        assert diff <= atol, f"{k}: max |diff| {diff:.3g} > {atol}"
    print(f"max |ours - mergekit| = {worst:.3g}")
    return worst


def model_entries(experts, params_per_model):
    return [{"model": e, "parameters": p} for e, p in zip(experts, params_per_model, strict=True)]


def test_linear(family, mat):
    root, base, experts = family
    w = [0.3, 0.9]
    theirs = run_mergekit(
        root, "linear", {"merge_method": "linear", "models": model_entries(experts, [{"weight": x} for x in w])}
    )
    assert_close(mat.merged_state_dict(uniform_recipe(base, experts, "linear", w)), theirs)


@pytest.mark.parametrize("lam", [1.0, 0.7])
def test_task_arithmetic(family, mat, lam):
    root, base, experts = family
    w = [0.6, 0.8]
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": base,
        "parameters": {"lambda": lam},
        "models": model_entries(experts, [{"weight": x} for x in w]),
    }
    theirs = run_mergekit(root, f"ta{lam}", cfg)
    ours = mat.merged_state_dict(uniform_recipe(base, experts, "task_arithmetic", w, params={"lambda": lam}))
    assert_close(ours, theirs)


@pytest.mark.parametrize("normalize", [True, False])
def test_ties(family, mat, normalize):
    root, base, experts = family
    w, dens = [0.7, 0.5], [0.5, 0.3]
    cfg = {
        "merge_method": "ties",
        "base_model": base,
        "parameters": {"normalize": normalize},
        "models": model_entries(experts, [{"weight": x, "density": d} for x, d in zip(w, dens, strict=True)]),
    }
    theirs = run_mergekit(root, f"ties{normalize}", cfg)
    ours = mat.merged_state_dict(uniform_recipe(base, experts, "ties", w, dens, params={"normalize": normalize}))
    assert_close(ours, theirs)


def test_ties_quantile_index_is_close(family):
    """The memory-saving quantile index trims within 1/quantile_points of the exact density."""
    _, base, experts = family
    exact = Materializer(base, experts)
    approx = Materializer(base, experts, trim_index="quantile", quantile_points=257)
    r = uniform_recipe(base, experts, "ties", [0.7, 0.5], [0.5, 0.3])
    a, b = exact.merged_state_dict(r), approx.merged_state_dict(r)
    for k in a:
        frac = (a[k] != b[k]).float().mean().item()
        assert frac <= 2 * 2 / 257 + 1e-9, (k, frac)


def test_ties_per_layer_gradient(family, mat):
    """A mergekit weight gradient [0.2, 0.8] over 3 blocks equals per-block groups 0.2, 0.5, 0.8."""
    root, base, experts = family
    cfg = {
        "merge_method": "ties",
        "base_model": base,
        "models": model_entries(
            experts, [{"weight": [0.2, 0.8], "density": 0.6}, {"weight": [0.8, 0.2], "density": 0.4}]
        ),
    }
    theirs = run_mergekit(root, "ties_grad", cfg)
    dens = [0.6, 0.4]
    groups = [LayerGroup(name="embed", kind="embed", weights=[0.2, 0.8], densities=dens)]
    for i, (a, b) in enumerate([(0.2, 0.8), (0.5, 0.5), (0.8, 0.2)]):
        groups.append(LayerGroup(name=f"b{i}", kind="blocks", start=i, stop=i + 1, weights=[a, b], densities=dens))
    # mergekit evaluates the gradient of the tensors after the blocks (final norm, lm_head) at t=0
    groups.append(LayerGroup(name="head", kind="head", weights=[0.2, 0.8], densities=dens))
    r = Recipe(base=base, sources=experts, method="ties", groups=groups)
    assert_close(mat.merged_state_dict(r), theirs)


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
def test_dare_density_one_is_exact(family, mat, method):
    root, base, experts = family
    w = [0.9, 0.6]
    cfg = {
        "merge_method": method,
        "base_model": base,
        "models": model_entries(experts, [{"weight": x, "density": 1.0} for x in w]),
    }
    theirs = run_mergekit(root, f"{method}_d1", cfg)
    ours = mat.merged_state_dict(uniform_recipe(base, experts, method, w, [1.0, 1.0]))
    assert_close(ours, theirs)


def test_dare_linear_in_distribution(family, mat):
    """One source, weight 1, density p: both keep ~p of the entries; L1 rescale preserves ||tau||_1."""
    root, base, _ = family
    expert = family[2][0]
    p = 0.4
    cfg = {
        "merge_method": "dare_linear",
        "base_model": base,
        "models": [{"model": expert, "parameters": {"weight": 1.0, "density": p}}],
    }
    theirs = run_mergekit(root, "dare_linear_stat", cfg)
    one = Materializer(base, [expert])
    base_sd = one.base
    tau = {k: v[0] for k, v in one.deltas.items()}
    for rescale in ["l1", "inverse"]:
        r = Recipe(
            base=base,
            sources=[expert],
            method="dare",
            params={"rescale": rescale},
            seed=3,
            groups=[
                LayerGroup(name="all", kind="embed", weights=[1.0], densities=[p]),
                LayerGroup(name="b", kind="blocks", start=0, stop=N_LAYERS, weights=[1.0], densities=[p]),
                LayerGroup(name="head", kind="head", weights=[1.0], densities=[p]),
            ],
        )
        ours = one.merged_state_dict(r)
        for k, t in tau.items():
            n = t.numel()
            for merged in (ours[k], theirs[k]):
                d = merged.float() - base_sd[k]
                kept = (d != 0).float().mean().item()
                assert abs(kept - p) <= 5 * math.sqrt(p * (1 - p) / n) + 1e-9, (k, kept)
            d_ours = ours[k] - base_sd[k]
            if rescale == "l1":
                # both rescale the kept entries so that the L1 norm is the one before the drop
                for merged in (ours[k], theirs[k]):
                    l1 = (merged.float() - base_sd[k]).abs().sum()
                    torch.testing.assert_close(l1, t.abs().sum(), rtol=1e-4, atol=1e-6)
            else:
                nz = d_ours != 0
                torch.testing.assert_close(d_ours[nz], t[nz] / p, rtol=1e-5, atol=1e-6)


def test_dare_ties_in_distribution(family, mat):
    """Two sources at density 0.5 with mergekit's L1 rescale: per-tensor statistics of the merged task
    vector agree with mergekit's within sampling noise."""
    root, base, experts = family
    w, dens = [0.8, 0.6], [0.5, 0.5]
    cfg = {
        "merge_method": "dare_ties",
        "base_model": base,
        "models": model_entries(experts, [{"weight": x, "density": d} for x, d in zip(w, dens, strict=True)]),
    }
    theirs = run_mergekit(root, "dare_ties_stat", cfg)
    ours = mat.merged_state_dict(uniform_recipe(base, experts, "dare_ties", w, dens, params={"rescale": "l1"}))
    for k, b in mat.base.items():
        if b.numel() < 1000:
            continue
        a, t = ours[k] - b, theirs[k].float() - b
        for stat in (lambda x: (x != 0).float().mean(), lambda x: x.abs().mean(), lambda x: x.pow(2).mean()):
            sa, st = stat(a).item(), stat(t).item()
            assert abs(sa - st) <= 0.1 * abs(st), (k, sa, st)


def test_tied_embeddings_match(tmp_path):
    """A tied checkpoint (no lm_head.weight saved): same merge as mergekit, and the head follows."""
    base, experts = make_tiny_llama_family(tmp_path, n_experts=2, seed=5, tie_word_embeddings=True, num_hidden_layers=2)
    m = Materializer(base, experts)
    _BASES[:] = [m.base]
    assert "lm_head.weight" not in m.names
    cfg = {
        "merge_method": "ties",
        "base_model": base,
        "models": model_entries(experts, [{"weight": 0.5, "density": 0.5}] * 2),
    }
    theirs = run_mergekit(tmp_path, "tied", cfg)
    r = Recipe(
        base=base,
        sources=experts,
        method="ties",
        groups=[
            LayerGroup(name="e", kind="embed", weights=[0.5, 0.5], densities=[0.5, 0.5]),
            LayerGroup(name="b", kind="blocks", start=0, stop=2, weights=[0.5, 0.5], densities=[0.5, 0.5]),
            LayerGroup(name="h", kind="head", weights=[0.5, 0.5], densities=[0.5, 0.5]),
        ],
    )
    assert_close(m.merged_state_dict(r), theirs)
    model = m.new_model()
    m.apply(r, model)
    torch.testing.assert_close(model.lm_head.weight, theirs["model.embed_tokens.weight"], rtol=0, atol=ATOL)


# ---------------------------------------------------------------------------------- more operators


def params_recipe(base, experts, method, params, weights=None, densities=None, seed=0):
    k = len(experts)
    return uniform_recipe(base, experts, method, weights or [1.0] * k, densities, params=params, seed=seed)


@pytest.mark.parametrize("t", [0.3, 0.8])
def test_slerp_base_and_one_model(family, mat, t):
    root, base, experts = family
    cfg = {
        "merge_method": "slerp",
        "base_model": base,
        "parameters": {"t": t},
        "models": [{"model": base}, {"model": experts[0]}],
    }
    theirs = run_mergekit(root, f"slerp{t}", cfg)
    m = Materializer(base, experts[:1])
    _BASES[:] = [m.base]
    assert_close(m.merged_state_dict(params_recipe(base, experts[:1], "slerp", {"t": t})), theirs, atol=2e-5)
    _BASES[:] = [mat.base]


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
def test_breadcrumbs(family, mat, method):
    _BASES[:] = [mat.base]
    root, base, experts = family
    w, dens, gamma = [0.7, 0.5], [0.6, 0.4], 0.05
    cfg = {
        "merge_method": method,
        "base_model": base,
        "models": model_entries(
            experts, [{"weight": x, "density": d, "gamma": gamma} for x, d in zip(w, dens, strict=True)]
        ),
    }
    theirs = run_mergekit(root, method, cfg)
    ours = mat.merged_state_dict(uniform_recipe(base, experts, method, w, dens, params={"gamma": gamma}))
    assert_close(ours, theirs)


def test_model_stock(family, mat):
    _BASES[:] = [mat.base]
    root, base, experts = family
    cfg = {"merge_method": "model_stock", "base_model": base, "models": [{"model": e} for e in experts]}
    theirs = run_mergekit(root, "model_stock", cfg)
    ours = mat.merged_state_dict(params_recipe(base, experts, "model_stock", {}))
    assert_close(ours, theirs, atol=1e-5)


@pytest.mark.parametrize("select_topk", [1.0, 0.6, 0.25])
def test_sce(family, mat, select_topk):
    """SCE (a single operator file) against mergekit's ``sce``, through the materializer as a search runs it,
    and through ``evomerge merge``'s translation of the same mergekit config."""
    _BASES[:] = [mat.base]
    root, base, experts = family
    cfg = {"merge_method": "sce", "base_model": base, "models": [{"model": e} for e in experts],
           "parameters": {"select_topk": select_topk}}  # fmt: skip
    theirs = run_mergekit(root, f"sce{select_topk}", cfg)
    ours = mat.merged_state_dict(params_recipe(base, experts, "sce", {"select_topk": select_topk}))
    assert_close(ours, theirs)
    translated = mergekit_to_recipe({**cfg, "dtype": "float32"}).recipe
    assert translated.method == "sce"
    assert_close(mat.merged_state_dict(translated), theirs)


def test_passthrough_whole_model_is_bit_exact(family):
    root, base, experts = family
    cfg = {"merge_method": "passthrough", "models": [{"model": experts[1]}]}
    theirs = run_mergekit(root, "passthrough", cfg)
    ours = Materializer(base, experts).merged_state_dict(params_recipe(base, experts, "passthrough", {"source": 1}))
    for k, v in ours.items():
        assert torch.equal(v, theirs[k]), k


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_della_in_distribution(family, mat, method):
    """mergekit ranks per row and rescales by L1; evomerge ranks per tensor (rescale l1 here): the
    merged task vectors agree in kept fraction and norms within sampling noise."""
    root, base, experts = family
    w, dens, eps = [0.8, 0.6], [0.5, 0.4], 0.2
    cfg = {
        "merge_method": method,
        "base_model": base,
        "models": model_entries(
            experts, [{"weight": x, "density": d, "epsilon": eps} for x, d in zip(w, dens, strict=True)]
        ),
    }
    theirs = run_mergekit(root, method, cfg)
    r = uniform_recipe(base, experts, method, w, dens, params={"rescale": "l1", "epsilon": eps})
    ours = mat.merged_state_dict(r)
    for k, b in mat.base.items():
        if b.numel() < 1000:
            continue
        a, t = ours[k] - b, theirs[k].float() - b
        for stat in (lambda x: (x != 0).float().mean(), lambda x: x.abs().mean(), lambda x: x.pow(2).mean()):
            sa, st = stat(a).item(), stat(t).item()
            assert abs(sa - st) <= 0.1 * abs(st), (k, sa, st)


# ---------------------------------------------------------------------------------- exported configs


def _groups(k: int, per: list[dict], weights=None, densities=None) -> list[LayerGroup]:
    """embed, one group per block, head; ``per`` gives each group's params."""
    w = weights or [1.0] * k
    kinds = [("embed", None, None)] + [("blocks", i, i + 1) for i in range(N_LAYERS)] + [("head", None, None)]
    return [
        LayerGroup(name=f"g{j}", kind=kind, start=a, stop=b, weights=w, densities=densities, params=p or None)
        for j, ((kind, a, b), p) in enumerate(zip(kinds, per, strict=True))
    ]


@pytest.mark.parametrize("case", ["slerp_one", "slerp_two", "breadcrumbs_ties", "della", "passthrough"])
def test_exported_config_runs_in_mergekit(family, mat, case):
    """What recipe_to_mergekit writes for the operators its spec lets export, run by mergekit itself,
    gives evomerge's tensors: SLERP (per-layer t; of two sources the first is mergekit's base), a
    per-model gamma, DELLA where nothing is dropped, passthrough's blocks as layer slices."""
    root, base, experts = family
    n = N_LAYERS + 2
    atol = ATOL
    if case == "slerp_one":
        r = Recipe(base=base, sources=experts[:1], method="slerp",
                   groups=_groups(1, [{"t": 0.1 + 0.8 * j / (n - 1)} for j in range(n)]))  # fmt: skip
        atol = 2e-5
    elif case == "slerp_two":
        r = Recipe(base=base, sources=experts, method="slerp", params={"t": 0.35}, groups=_groups(2, [{}] * n))
        atol = 2e-5
    elif case == "breadcrumbs_ties":
        r = Recipe(base=base, sources=experts, method=case, params={"gamma": 0.05},
                   groups=_groups(2, [{}] * n, [0.7, 0.5], [0.6, 0.4]))  # fmt: skip
    elif case == "della":
        r = Recipe(base=base, sources=experts, method=case, params={"epsilon": 0.1},
                   groups=_groups(2, [{}] * n, [0.7, 0.5], [1.0, 1.0]))  # fmt: skip
    else:
        src = [0, 0, 1, 1, 1]
        per = [{"source": s, "scale": 0.5 if j == 2 else 1.0} for j, s in enumerate(src)]
        r = Recipe(base=base, sources=experts, method=case, groups=_groups(2, per))
    cfg = recipe_to_mergekit(r)
    assert cfg is not None
    theirs = run_mergekit(root, f"export_{case}", cfg)
    ours, _ = build_state_dict(r)
    _BASES[:] = [mat.base]
    assert_close(ours, theirs, atol=atol)
