"""Invariants of the merge operators (docs/conventions.md), one suite over every registered operator."""

from __future__ import annotations

import math

import pytest
import torch

from evomerge.merge.operators import (
    CONTEXTS,
    OPERATORS,
    breadcrumb_thresholds,
    consensus,
    dare,
    dare_ties,
    della,
    della_keep_prob,
    della_linear,
    della_ranks,
    fisher,
    get_operator,
    linear,
    lines,
    lines_scale,
    magnitude_thresholds,
    model_stock,
    passthrough,
    pcb,
    resolve_params,
    slerp,
    task_arithmetic,
    ties,
    trim_count,
    tsv_m,
    widen,
)

ALL = sorted(OPERATORS)


def n_sources(name: str, want: int = 3) -> int:
    spec = OPERATORS[name]
    k = max(want, spec.min_sources)
    return min(k, spec.max_sources) if spec.max_sources is not None else k


def rand_inputs(k=3, shape=(17, 23), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g).to(dtype)
    deltas = (torch.randn((k, *shape), generator=g) * 0.1).to(dtype)
    weights = torch.rand(k, generator=g) + 0.2
    dens = torch.rand(k, generator=g) * 0.6 + 0.2
    return base, deltas, weights, dens


def context(name, deltas, layer=1, seed=0):
    """The extra inputs an operator declares (block index, Fisher...)."""
    spec = OPERATORS[name]
    ctx = {}
    if "layer" in spec.context:
        ctx.update(layer=layer, num_layers=4)
    if "name" in spec.context:
        ctx["name"] = "model.layers.1.mlp.up_proj.weight"
    if "fisher" in spec.context:
        shape = (len(deltas), *deltas[0].shape)
        ctx["fisher"] = torch.rand(shape, generator=torch.Generator().manual_seed(seed + 99)).float() + 0.1
    return ctx


def call(name, base, deltas, weights, dens, seed=0, **params):
    spec = OPERATORS[name]
    return spec.fn(
        base,
        deltas,
        weights,
        dens,
        generator=torch.Generator().manual_seed(seed),
        **context(name, deltas, seed=seed),
        **resolve_params(spec, params),
    )


def inputs_for(name, seed=0, dtype=torch.float32, shape=(17, 23), want=3):
    return rand_inputs(k=n_sources(name, want), shape=shape, seed=seed, dtype=dtype)


# ---------------------------------------------------------------------------------- generic suite


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_shape_and_dtype_kept(name, dtype):
    base, deltas, w, d = inputs_for(name, dtype=dtype)
    out = call(name, base, deltas, w, d)
    assert out.shape == base.shape and out.dtype == dtype
    assert torch.isfinite(out.float()).all()


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("shape", [(29,), (1, 7), (5, 3, 4)])
def test_other_shapes(name, shape):
    base, deltas, w, d = inputs_for(name, shape=shape, seed=2)
    out = call(name, base, deltas, w, d)
    assert out.shape == base.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ALL)
def test_deterministic_under_seed(name):
    base, deltas, w, d = inputs_for(name)
    a = call(name, base, deltas, w, d, seed=7)
    b = call(name, base, deltas, w, d, seed=7)
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("seed", range(4))
def test_finite_on_random_inputs(name, seed):
    base, deltas, w, d = inputs_for(name, seed=seed, want=4)
    k = deltas.shape[0]
    w = w * (torch.randint(0, 2, (k,), generator=torch.Generator().manual_seed(seed)) * 2 - 1)  # mixed signs
    assert torch.isfinite(call(name, base, deltas, w, d, seed=seed)).all()


@pytest.mark.parametrize("name", ALL)
def test_zero_weights_give_finite_result(name):
    base, deltas, _, d = inputs_for(name)
    out = call(name, base, deltas, torch.zeros(deltas.shape[0]), d)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ALL)
def test_no_task_vector_returns_base(name):
    base, deltas, w, d = inputs_for(name)
    out = call(name, base, torch.zeros_like(deltas), w, d)
    torch.testing.assert_close(out, base, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ALL)
def test_accepts_sequences(name):
    base, deltas, w, d = inputs_for(name)
    a = call(name, base, deltas, w, d, seed=1)
    b = call(name, base, list(deltas.unbind(0)), w.tolist(), d.tolist(), seed=1)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("name", ALL)
def test_spec_is_complete(name):
    spec = get_operator(name)
    assert spec.name == name and set(spec.source_genes) <= {"weight", "density"}
    assert spec.sparsify in (None, "magnitude", "outliers", "random", "della")
    assert set(spec.group_params) <= set(spec.params) and set(spec.context) <= CONTEXTS
    assert spec.fn.__doc__ and len(spec.fn.__doc__) > 60  # conventions are documented
    with pytest.raises(ValueError):
        resolve_params(spec, {"no_such_param": 1})


@pytest.mark.parametrize("name", [n for n in ALL if "whole" not in OPERATORS[n].context])
def test_chunked_equals_whole(name):
    """Given thresholds, draws and ranks, a streaming operator is elementwise: chunks merge like the
    whole tensor (what the materializer's streaming relies on)."""
    base, deltas, w, d = inputs_for(name)
    k = deltas.shape[0]
    spec = OPERATORS[name]
    params = resolve_params(spec, {})
    sp, _ = spec.resolved(params)
    thr = None
    if sp == "magnitude":
        thr = magnitude_thresholds(deltas, d)
    elif sp == "outliers":
        thr = breadcrumb_thresholds(deltas, d, params.get("gamma", 0.01))
    noise = torch.rand(deltas.shape, generator=torch.Generator().manual_seed(3))
    ranks = della_ranks(deltas)
    ctx = context(name, deltas)
    whole = spec.fn(base, deltas, w, d, thresholds=thr, noise=noise, ranks=ranks, **ctx, **params).reshape(-1)
    bf, df, nf, rf = base.reshape(-1), deltas.reshape(k, -1), noise.reshape(k, -1), ranks.reshape(k, -1)
    parts = []
    for s in range(0, bf.numel(), 50):
        c = dict(ctx)
        if "fisher" in c:
            c["fisher"] = c["fisher"].reshape(k, -1)[:, s : s + 50]
        parts.append(
            spec.fn(
                bf[s : s + 50],
                df[:, s : s + 50],
                w,
                d,
                thresholds=thr,
                noise=nf[:, s : s + 50],
                ranks=rf[:, s : s + 50],
                **c,
                **params,
            )
        )
    assert torch.equal(whole, torch.cat(parts))


# ------------------------------------------------------------------------- invariants every operator keeps


def test_dare_density_one_equals_task_arithmetic():
    base, deltas, w, _ = rand_inputs()
    ones = torch.ones(3)
    for rescale in ("inverse", "l1", "none"):
        torch.testing.assert_close(
            dare(base, deltas, w, ones, rescale=rescale), task_arithmetic(base, deltas, w), rtol=0, atol=0
        )


def test_dare_ties_density_one_equals_ties_density_one():
    base, deltas, w, _ = rand_inputs()
    ones = torch.ones(3)
    for normalize in (True, False):
        torch.testing.assert_close(
            dare_ties(base, deltas, w, ones, normalize=normalize),
            ties(base, deltas, w, ones, normalize=normalize),
            rtol=0,
            atol=0,
        )


@pytest.mark.parametrize("normalize", [True, False])
def test_ties_one_model_density_one_is_task_arithmetic(normalize):
    base, deltas, _, _ = rand_inputs(k=1)
    w = torch.tensor([0.7])
    expect = task_arithmetic(base, deltas, w, normalize=normalize)
    torch.testing.assert_close(ties(base, deltas, w, torch.ones(1), normalize=normalize), expect)


def test_linear_of_identical_models_returns_the_model():
    base, deltas, _, _ = rand_inputs(k=1)
    same = deltas.expand(4, *deltas.shape[1:]).clone()
    w = torch.tensor([0.1, 0.5, 2.0, 0.7])
    torch.testing.assert_close(linear(base, same, w), base + deltas[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("per_row", [True, False])
def test_slerp_endpoints(per_row):
    base, deltas, _, _ = rand_inputs(k=2)
    assert torch.equal(slerp(base, deltas, t=0.0, per_row=per_row), base + deltas[0])
    assert torch.equal(slerp(base, deltas, t=1.0, per_row=per_row), base + deltas[1])
    assert torch.equal(slerp(base, deltas[:1], t=0.0, per_row=per_row), base)
    assert torch.equal(slerp(base, deltas[:1], t=1.0, per_row=per_row), base + deltas[0])
    with pytest.raises(ValueError):
        slerp(base, torch.cat([deltas, deltas]), t=0.5)


@pytest.mark.parametrize("base_method", ["task_arithmetic", "ties", "dare_ties"])
def test_consensus_k0_is_its_base_merge(base_method):
    base, deltas, w, d = rand_inputs()
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    ref = OPERATORS[base_method].fn(base, deltas, w, d, generator=g(), **resolve_params(OPERATORS[base_method], {}))
    out = consensus(base, deltas, w, d, k=0, base_method=base_method, generator=g())
    assert torch.equal(out, ref)


def test_whole_model_passthrough_is_exact_given_the_tensor():
    base, deltas, _, _ = rand_inputs(k=2)
    src = torch.randn(base.shape)
    assert torch.equal(passthrough(base, deltas, source=1, source_tensor=src), src)
    assert torch.equal(passthrough(base, deltas, source=-1), base)
    torch.testing.assert_close(passthrough(base, deltas, source=1), base + deltas[1], rtol=0, atol=0)


# ---------------------------------------------------------------------------------- reference cases


def test_linear_is_the_weighted_average_of_models():
    base, deltas, w, _ = rand_inputs()
    models = base + deltas
    expect = (models * w.view(-1, 1, 1)).sum(0) / w.sum()
    torch.testing.assert_close(linear(base, deltas, w), expect, rtol=1e-6, atol=1e-6)
    expect_sum = (models * w.view(-1, 1, 1)).sum(0)
    torch.testing.assert_close(linear(base, deltas, w, normalize=False), expect_sum, rtol=1e-5, atol=1e-5)


def test_task_arithmetic_formula():
    base, deltas, w, _ = rand_inputs()
    out = task_arithmetic(base, deltas, w, **{"lambda": 0.3})
    torch.testing.assert_close(out, base + 0.3 * (w.view(-1, 1, 1) * deltas).sum(0))


def test_ties_trim_keeps_top_density_per_tensor():
    base, deltas, _, _ = rand_inputs(k=1, shape=(100,))
    out = ties(base, deltas, torch.ones(1), torch.tensor([0.25]))
    assert (out != base).sum().item() == trim_count(0.25, 100) == 25
    assert set(torch.nonzero(out != base).flatten().tolist()) == set(deltas[0].abs().topk(25).indices.tolist())


def test_ties_sign_election_and_disjoint_mean():
    base = torch.zeros(3)
    deltas = torch.tensor([[1.0, 2.0, -1.0], [-3.0, 1.0, -1.0], [1.0, 3.0, 5.0]])
    w = torch.ones(3)
    torch.testing.assert_close(ties(base, deltas, w, torch.ones(3)), torch.tensor([-3.0, 2.0, 5.0]))
    torch.testing.assert_close(ties(base, deltas, w, torch.ones(3), normalize=False), torch.tensor([-3.0, 6.0, 5.0]))


def test_dare_keeps_about_density_and_rescales():
    base = torch.zeros(20000)
    deltas = torch.full((1, 20000), 0.5)
    g = torch.Generator().manual_seed(0)
    out = dare(base, deltas, torch.ones(1), torch.tensor([0.3]), generator=g)
    assert abs((out != 0).float().mean().item() - 0.3) < 0.02
    torch.testing.assert_close(out[out != 0], torch.full_like(out[out != 0], 0.5 / 0.3))
    out_l1 = dare(base, deltas, torch.ones(1), torch.tensor([0.3]), generator=g, rescale="l1")
    torch.testing.assert_close(out_l1.abs().sum(), deltas.abs().sum(), rtol=1e-5, atol=1e-3)


def test_dare_masks_nested_across_densities():
    base, deltas, w, _ = rand_inputs(k=1)
    lo = dare(base, deltas, w, torch.tensor([0.2]), generator=torch.Generator().manual_seed(4))
    hi = dare(base, deltas, w, torch.tensor([0.6]), generator=torch.Generator().manual_seed(4))
    assert bool(((lo != base) <= (hi != base)).all())


def test_density_zero_drops_everything():
    base, deltas, w, _ = rand_inputs()
    z = torch.zeros(3)
    for fn in (ties, dare, dare_ties, della, della_linear):
        torch.testing.assert_close(fn(base, deltas, w, z, generator=torch.Generator().manual_seed(0)), base)


def test_trim_count_and_thresholds_follow_mergekit():
    assert (trim_count(0.5, 10), trim_count(0.01, 10), trim_count(0.0, 10), trim_count(1.0, 10)) == (5, 1, 0, 10)
    _, deltas, _, dens = rand_inputs(k=3, shape=(311,))
    thr = magnitude_thresholds(deltas, dens)
    for i in range(3):
        assert (deltas[i].abs() >= thr[i]).sum().item() == trim_count(float(dens[i]), 311)


@pytest.mark.parametrize("density,gamma", [(0.5, 0.01), (0.3, 0.1), (0.95, 0.1), (0.2, 0.0), (1.0, 0.1)])
def test_breadcrumbs_band_is_mergekits(density, gamma):
    import mergekit.sparsify as sparsify
    _, deltas, _, _ = rand_inputs(k=1, shape=(40, 25), seed=3)
    thr = breadcrumb_thresholds(deltas, torch.tensor([density]), gamma)
    ours = deltas[0] * ((deltas[0].abs() >= thr[0, 0]) & (deltas[0].abs() <= thr[0, 1]))
    theirs = sparsify.magnitude_outliers(deltas[0], density=density, gamma=gamma)
    assert torch.equal(ours, theirs)


def test_della_epsilon_zero_is_dare():
    base, deltas, w, d = rand_inputs()
    noise = torch.rand(deltas.shape, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(
        della_linear(base, deltas, w, d, noise=noise, epsilon=0.0), dare(base, deltas, w, d, noise=noise)
    )
    torch.testing.assert_close(
        della(base, deltas, w, d, noise=noise, epsilon=0.0, normalize=False), dare_ties(base, deltas, w, d, noise=noise)
    )


def test_della_keep_probability_follows_rank():
    base = torch.zeros(40000)
    deltas = torch.randn(1, 40000, generator=torch.Generator().manual_seed(0))
    ranks = della_ranks(deltas)
    assert ranks.min() == 0 and ranks.max() == 1
    p = della_keep_prob(ranks, torch.tensor([0.4]), 0.2)
    torch.testing.assert_close(p.min(), torch.tensor(0.2))
    torch.testing.assert_close(p.max(), torch.tensor(0.6))
    out = della_linear(
        base, deltas, torch.ones(1), torch.tensor([0.4]), epsilon=0.2, generator=torch.Generator().manual_seed(1)
    )
    kept = (out != 0).float()
    lo, hi = ranks[0] < 0.2, ranks[0] > 0.8
    assert abs(kept[lo].mean().item() - 0.24) < 0.02 and abs(kept[hi].mean().item() - 0.56) < 0.02
    assert abs(kept.mean().item() - 0.4) < 0.01
    # inverse rescale: unbiased per entry
    nz = out != 0
    torch.testing.assert_close(out[nz] * p[0][nz], deltas[0][nz])


def test_model_stock_reference_cases():
    base, deltas, _, _ = rand_inputs(k=1)
    same = torch.cat([deltas, deltas])
    torch.testing.assert_close(model_stock(base, same), base + deltas[0])  # cos 1: t = 1
    a = torch.zeros(2, 4)
    a[0, 0], a[1, 1] = 1.0, 1.0  # orthogonal: cos 0, t = 0
    torch.testing.assert_close(model_stock(torch.zeros(4), a), torch.zeros(4))
    # general: t = k cos / (1 + (k - 1) cos), result theta0 + t mean(tau)
    base, deltas, _, _ = rand_inputs(k=3)
    f = deltas.reshape(3, -1)
    cos = torch.stack([torch.cosine_similarity(f[i], f[j], dim=0) for i, j in ((0, 1), (0, 2), (1, 2))]).mean()
    t = 3 * cos / (1 + 2 * cos)
    torch.testing.assert_close(model_stock(base, deltas), base + t * deltas.mean(0), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        model_stock(base, deltas[:1])


def test_lines_scales_by_depth():
    assert lines_scale(0, 5, 0.2, 0.8) == 0.2 and lines_scale(4, 5, 0.2, 0.8) == 1.0
    assert lines_scale("embed", 5, 0.2, 0.8) == 0.2 and lines_scale("head", 5, 0.2, 0.8) == 1.0
    assert lines_scale(2, 5, 0.2, 0.8) == pytest.approx(0.6)
    base, deltas, w, d = rand_inputs()
    ta = task_arithmetic(base, deltas, w)
    assert torch.equal(lines(base, deltas, w, d, layer=3, num_layers=5), ta)  # alpha 1, beta 0: the base merge
    out = lines(base, deltas, w, d, layer=2, num_layers=5, alpha=0.2, beta=0.8)
    torch.testing.assert_close(out, base + 0.6 * (ta - base))
    tie = ties(base, deltas, w, d)
    out = lines(base, deltas, w, d, layer=0, num_layers=5, alpha=0.5, beta=0.5, base_method="ties")
    torch.testing.assert_close(out, base + 0.5 * (tie - base))


def test_consensus_masks():
    base = torch.zeros(4)
    # entry 0: all agree -> both masks; entry 1: only source 0 large; entry 2: opposite equal
    deltas = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.01, -1.0, 0.0]])
    w = torch.ones(2)
    ta = task_arithmetic(base, deltas, w)
    out = consensus(base, deltas, w, k=2, mask_lambda=0.5)
    # tau_mtl = [2, 1.01, 0, 0]; masks: src0 |1|>=.5|1| yes,|1|>=.5*.01 yes,|1|>=.5*1 yes, 0>=0 yes
    # src1: yes, .01 >= .5*1 no, 1 >= .5 yes, yes -> counts [2, 1, 2, 2]
    torch.testing.assert_close(out, torch.tensor([ta[0].item(), 0.0, ta[2].item(), 0.0]))


def test_pcb_identical_sources_keep_the_task_vector():
    base, deltas, _, _ = rand_inputs(k=1, shape=(40, 50))
    same = deltas.expand(3, 40, 50).clone()
    out = pcb(base, same, torch.ones(3), torch.ones(3))
    close = ((out - base - deltas[0]).abs() <= 1e-5).float().mean().item()
    assert close > 0.99  # all but the clipped outliers and the lowest-score entry
    # density drops the lowest-score entries of each source
    out = pcb(base, same, torch.ones(3), torch.full((3,), 0.3))
    assert abs((out != base).float().mean().item() - 0.3) < 0.02


def test_widen_one_model_is_that_model():
    base, deltas, _, _ = rand_inputs(k=1)
    for layer in (1, "embed"):
        torch.testing.assert_close(widen(base, deltas, torch.ones(1), layer=layer), base + deltas[0])
    b1, d1, _, _ = rand_inputs(k=1, shape=(31,))
    torch.testing.assert_close(widen(b1, d1, torch.ones(1)), b1 + d1[0])


def test_widen_prefers_the_model_that_moved_a_column():
    base = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
    deltas = torch.zeros(2, 8, 6)
    deltas[0, :, 0] = 1.0  # source 0 moves column 0 a lot
    deltas[1, :, 1] = 1.0  # source 1 moves column 1
    out = widen(base, deltas, torch.ones(2), calibration=1.0)
    torch.testing.assert_close(out[:, 0], base[:, 0] + 1.0)  # calibrated score 1 for the mover
    torch.testing.assert_close(out[:, 1], base[:, 1] + 1.0)


def test_tsv_m_reference_cases():
    base, deltas, _, _ = rand_inputs(k=1, shape=(12, 9))
    torch.testing.assert_close(tsv_m(base, deltas, torch.ones(1), fraction=1.0), base + deltas[0], rtol=1e-4, atol=1e-5)
    # two task vectors in orthogonal subspaces (rank 1 each) are recovered exactly at fraction 1/9
    u = torch.linalg.qr(torch.randn(12, 2, generator=torch.Generator().manual_seed(1))).Q
    v = torch.linalg.qr(torch.randn(9, 2, generator=torch.Generator().manual_seed(2))).Q
    t0, t1 = 2.0 * torch.outer(u[:, 0], v[:, 0]), 0.5 * torch.outer(u[:, 1], v[:, 1])
    out = tsv_m(torch.zeros(12, 9), torch.stack([t0, t1]), torch.ones(2), fraction=1 / 9)
    torch.testing.assert_close(out, t0 + t1, rtol=1e-4, atol=1e-5)
    # a rank-r reconstruction keeps the low-rank structure: rank <= K * r
    _, deltas, _, _ = rand_inputs(k=3, shape=(12, 9))
    out = tsv_m(torch.zeros(12, 9), deltas, torch.ones(3), fraction=1 / 9)
    assert torch.linalg.matrix_rank(out).item() <= 3


def test_fisher_weighting():
    base, deltas, w, _ = rand_inputs()
    torch.testing.assert_close(fisher(base, deltas, w, fisher=torch.ones_like(deltas)), linear(base, deltas, w))
    f = torch.ones_like(deltas) * 1e-6
    f[1] = 1.0  # source 1 holds all the information
    torch.testing.assert_close(fisher(base, deltas, w, fisher=f), base + deltas[1], rtol=1e-4, atol=1e-4)
    # elementwise: sum w F theta / sum w F
    f = torch.rand(deltas.shape, generator=torch.Generator().manual_seed(3))
    models = base + deltas
    wf = w.view(-1, 1, 1) * f
    torch.testing.assert_close(
        fisher(base, deltas, w, fisher=f), (wf * models).sum(0) / wf.sum(0), rtol=1e-5, atol=1e-5
    )


def test_slerp_matches_the_formula():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    c = torch.tensor([[0.0, 1.0], [0.0, 4.0]])  # row 0 orthogonal (slerp), row 1 colinear (lerp)
    out = slerp(a, (c - a).unsqueeze(0), t=0.5, per_row=True)
    torch.testing.assert_close(out[0], torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]))
    torch.testing.assert_close(out[1], torch.tensor([0.0, 3.0]))
    # whole tensor (default): one angle for the flattened pair
    x, y = a.reshape(-1), c.reshape(-1)
    th = torch.acos(torch.dot(x / x.norm(), y / y.norm()))
    want = (torch.sin(0.5 * th) * x + torch.sin(0.5 * th) * y) / torch.sin(th)
    torch.testing.assert_close(slerp(a, (c - a).unsqueeze(0), t=0.5).reshape(-1), want)


def test_unknown_method_and_aliases():
    with pytest.raises(KeyError):
        get_operator("nope")
    assert get_operator("dare_linear").name == "dare"
