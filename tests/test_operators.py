"""Invariants of the merge operators (DESIGN section 4), one suite over every registered operator."""

from __future__ import annotations

import pytest
import torch

from evomerge.merge.operators import (
    OPERATORS,
    dare,
    dare_ties,
    get_operator,
    linear,
    magnitude_thresholds,
    resolve_params,
    task_arithmetic,
    ties,
    trim_count,
)

ALL = sorted(OPERATORS)


def rand_inputs(k=3, shape=(17, 23), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g).to(dtype)
    deltas = (torch.randn((k, *shape), generator=g) * 0.1).to(dtype)
    weights = torch.rand(k, generator=g) + 0.2
    dens = torch.rand(k, generator=g) * 0.8 + 0.1
    return base, deltas, weights, dens


def call(name, base, deltas, weights, dens, seed=0, **params):
    spec = OPERATORS[name]
    return spec.fn(
        base, deltas, weights, dens, generator=torch.Generator().manual_seed(seed), **resolve_params(spec, params)
    )


# ---------------------------------------------------------------------------------- generic suite


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_shape_and_dtype_kept(name, dtype):
    base, deltas, w, d = rand_inputs(dtype=dtype)
    out = call(name, base, deltas, w, d)
    assert out.shape == base.shape and out.dtype == dtype


@pytest.mark.parametrize("name", ALL)
def test_deterministic_under_seed(name):
    base, deltas, w, d = rand_inputs()
    a = call(name, base, deltas, w, d, seed=7)
    b = call(name, base, deltas, w, d, seed=7)
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("seed", range(5))
def test_finite_on_random_inputs(name, seed):
    base, deltas, w, d = rand_inputs(k=4, seed=seed)
    w = w * (torch.randint(0, 2, (4,), generator=torch.Generator().manual_seed(seed)) * 2 - 1)  # mixed signs
    assert torch.isfinite(call(name, base, deltas, w, d, seed=seed)).all()


@pytest.mark.parametrize("name", ALL)
def test_zero_weights_give_finite_result(name):
    base, deltas, _, d = rand_inputs()
    out = call(name, base, deltas, torch.zeros(3), d)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ALL)
def test_no_task_vector_returns_base(name):
    base, deltas, w, d = rand_inputs()
    out = call(name, base, torch.zeros_like(deltas), w, d)
    torch.testing.assert_close(out, base, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ALL)
def test_accepts_sequences(name):
    base, deltas, w, d = rand_inputs()
    a = call(name, base, deltas, w, d, seed=1)
    b = call(name, base, list(deltas.unbind(0)), w.tolist(), d.tolist(), seed=1)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("name", ALL)
def test_spec_is_complete(name):
    spec = get_operator(name)
    assert spec.name == name and "weight" in spec.source_genes
    assert spec.sparsify in (None, "magnitude", "random")
    with pytest.raises(ValueError):
        resolve_params(spec, {"no_such_param": 1})


@pytest.mark.parametrize("name", ALL)
def test_chunked_equals_whole(name):
    """Given thresholds and noise, every operator is elementwise: chunks merge like the whole tensor
    (what the materializer's streaming relies on)."""
    base, deltas, w, d = rand_inputs()
    spec = OPERATORS[name]
    params = resolve_params(spec, {})
    thr = magnitude_thresholds(deltas, d) if spec.sparsify == "magnitude" else None
    noise = torch.rand(deltas.shape, generator=torch.Generator().manual_seed(3))
    whole = spec.fn(base, deltas, w, d, thresholds=thr, noise=noise, **params).reshape(-1)
    bf, df, nf = base.reshape(-1), deltas.reshape(3, -1), noise.reshape(3, -1)
    parts = [
        spec.fn(bf[s : s + 50], df[:, s : s + 50], w, d, thresholds=thr, noise=nf[:, s : s + 50], **params)
        for s in range(0, bf.numel(), 50)
    ]
    assert torch.equal(whole, torch.cat(parts))


# ---------------------------------------------------------------------------------- named invariants


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


def test_ties_one_model_with_lambda():
    base, deltas, _, _ = rand_inputs(k=1)
    w = torch.tensor([1.0])
    out = ties(base, deltas, w, torch.ones(1), **{"lambda": 0.5})
    torch.testing.assert_close(out, base + 0.5 * deltas[0])


def test_linear_of_identical_models_returns_the_model():
    base, deltas, _, _ = rand_inputs(k=1)
    same = deltas.expand(4, *deltas.shape[1:]).clone()
    w = torch.tensor([0.1, 0.5, 2.0, 0.7])
    torch.testing.assert_close(linear(base, same, w), base + deltas[0], rtol=0, atol=1e-6)


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
    d = torch.tensor([0.25])
    out = ties(base, deltas, torch.ones(1), d)
    kept = (out != base).sum().item()
    assert kept == trim_count(0.25, 100) == 25
    assert (out - base).abs().min() >= 0 and set(torch.nonzero(out != base).flatten().tolist()) == set(
        deltas[0].abs().topk(25).indices.tolist()
    )


def test_ties_sign_election_and_disjoint_mean():
    base = torch.zeros(3)
    deltas = torch.tensor([[1.0, 2.0, -1.0], [-3.0, 1.0, -1.0], [1.0, 3.0, 5.0]])
    w = torch.ones(3)
    out = ties(base, deltas, w, torch.ones(3))
    # entry 0: sum = -1 -> negative elected, only -3 agrees; entry 1: all positive, mean 2;
    # entry 2: sum 3 -> positive, only 5 agrees
    torch.testing.assert_close(out, torch.tensor([-3.0, 2.0, 5.0]))
    out_sum = ties(base, deltas, w, torch.ones(3), normalize=False)
    torch.testing.assert_close(out_sum, torch.tensor([-3.0, 6.0, 5.0]))


def test_ties_weights_vote_before_election():
    base = torch.zeros(1)
    deltas = torch.tensor([[1.0], [-1.5]])
    # weighted: 3*1 = 3 vs 1*-1.5 -> positive wins
    out = ties(base, deltas, torch.tensor([3.0, 1.0]), torch.ones(2))
    torch.testing.assert_close(out, torch.tensor([1.0]))


def test_dare_keeps_about_density_and_rescales():
    base = torch.zeros(20000)
    deltas = torch.full((1, 20000), 0.5)
    g = torch.Generator().manual_seed(0)
    out = dare(base, deltas, torch.ones(1), torch.tensor([0.3]), generator=g)
    kept = (out != 0).float().mean().item()
    assert abs(kept - 0.3) < 0.02
    torch.testing.assert_close(out[out != 0], torch.full_like(out[out != 0], 0.5 / 0.3))
    # L1 rescale keeps the L1 norm
    out_l1 = dare(base, deltas, torch.ones(1), torch.tensor([0.3]), generator=g, rescale="l1")
    torch.testing.assert_close(out_l1.abs().sum(), deltas.abs().sum(), rtol=1e-5, atol=1e-3)


def test_dare_masks_nested_across_densities():
    base, deltas, w, _ = rand_inputs(k=1)
    lo = dare(base, deltas, w, torch.tensor([0.2]), generator=torch.Generator().manual_seed(4))
    hi = dare(base, deltas, w, torch.tensor([0.6]), generator=torch.Generator().manual_seed(4))
    assert bool(((lo != base) <= (hi != base)).all())


def test_dare_seed_changes_mask():
    base, deltas, w, d = rand_inputs()
    a = dare(base, deltas, w, d, generator=torch.Generator().manual_seed(1))
    b = dare(base, deltas, w, d, generator=torch.Generator().manual_seed(2))
    assert not torch.equal(a, b)


def test_density_zero_drops_everything():
    base, deltas, w, _ = rand_inputs()
    z = torch.zeros(3)
    for fn in (ties, dare, dare_ties):
        torch.testing.assert_close(fn(base, deltas, w, z, generator=torch.Generator().manual_seed(0)), base)


def test_trim_count_follows_mergekit():
    assert trim_count(0.5, 10) == 5
    assert trim_count(0.01, 10) == 1  # at least one entry for positive density
    assert trim_count(0.0, 10) == 0
    assert trim_count(1.0, 10) == 10
    assert trim_count(0.37, 100) == 37


def test_magnitude_thresholds_match_topk():
    _, deltas, _, dens = rand_inputs(k=3, shape=(311,))
    thr = magnitude_thresholds(deltas, dens)
    for i in range(3):
        k = trim_count(float(dens[i]), 311)
        assert (deltas[i].abs() >= thr[i]).sum().item() == k


def test_unknown_method_and_aliases():
    with pytest.raises(KeyError):
        get_operator("nope")
    assert get_operator("dare_linear").name == "dare"
