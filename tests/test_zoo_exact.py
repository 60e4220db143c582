"""Exact matrix products (evomerge.zoo.exact): the zoo's weights must not depend on the BLAS's summation order."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from evomerge import zoo
from evomerge.zoo import numerics
from evomerge.zoo.exact import ExactMatmul, bits_for, exact_mm

TINY = 0.005


def _operands(seed: int, m: int, k: int, n: int, batch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lead = (batch,) if batch else ()
    # magnitudes spread over rows and columns, as activations and gradients are
    a = torch.randn(*lead, m, k, generator=g) * torch.exp(3 * torch.randn(*lead, m, 1, generator=g))
    b = torch.randn(*lead, k, n, generator=g) * torch.exp(3 * torch.randn(*lead, 1, n, generator=g))
    return a, b


def test_the_order_of_the_sum_changes_a_blas_product_and_not_an_exact_one():
    a, b = _operands(0, 64, 2048, 96)
    perm = torch.randperm(2048, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(a @ b, a[:, perm] @ b[perm])  # the BLAS's own order leaks into its bits
    assert torch.equal(exact_mm(a, b), exact_mm(a[:, perm], b[perm]))
    # the exact value rounded once: as close to float64's product as a float32 grid of 21 bits allows
    ref = a.double() @ b.double()
    scale = a.abs().amax(1, keepdim=True).double() * b.abs().amax(0, keepdim=True).double()
    # each entry moves by at most 2**-p of its row (column) maximum, so the sum by 2 * k * 2**-p of their product
    assert ((exact_mm(a, b).double() - ref).abs() / scale).max() <= 2 * 2048 * 2.0 ** -bits_for(2048)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), m=st.integers(1, 9), k=st.integers(1, 300), n=st.integers(1, 9),
       batch=st.sampled_from([0, 3]))
def test_exact_products_do_not_depend_on_the_order_of_the_sum(seed, m, k, n, batch):
    a, b = _operands(seed, m, k, n, batch)
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
    got = exact_mm(a, b)
    assert got.dtype == torch.float32 and got.shape == (a @ b).shape
    assert torch.equal(got, exact_mm(a[..., perm], b[..., perm, :]))
    # the same as summing in float64 from a fixed order, where the float64 sum is itself exact
    assert torch.allclose(got, (a.double() @ b.double()).float(), rtol=1e-4, atol=1e-30 + 1e-5 * float(
        (a.abs().amax() * b.abs().amax()).item()))
    assert torch.equal(exact_mm(torch.zeros(m, k), b[0] if batch else b), torch.zeros(m, n))


def test_the_mode_makes_forward_and_backward_products_exact():
    x, w = _operands(2, 16, 40, 24)
    w = w.t().contiguous().requires_grad_(True)  # Linear's (out, in) layout
    x.requires_grad_(True)
    g = torch.randn(16, 24)
    with ExactMatmul():
        y = torch.nn.functional.linear(x, w, torch.ones(24))
        y.backward(g)
    assert torch.equal(y.detach(), exact_mm(x.detach(), w.detach().t()) + 1)
    assert torch.equal(x.grad, exact_mm(g, w.detach()))
    assert torch.equal(w.grad, exact_mm(g.t().contiguous(), x.detach()))
    q = torch.randn(2, 4, 8, 16)
    want = exact_mm(q.reshape(8, 8, 16), q.reshape(8, 8, 16).transpose(1, 2)).reshape(2, 4, 8, 8)
    with ExactMatmul():  # batched (attention's) products too
        assert torch.equal(q @ q.transpose(-1, -2), want)
        with pytest.raises(RuntimeError, match="scaled_dot_product"):  # a fused kernel sums in its own order
            torch.nn.functional.scaled_dot_product_attention(q, q, q)
        with pytest.raises(RuntimeError, match="float64"):
            q.double() @ q.double().transpose(-1, -2)
        i = torch.arange(6).reshape(2, 3)
        assert torch.equal(i @ i.t(), torch.tensor([[5, 14], [14, 50]]))  # integers: exact already


@pytest.mark.slow
def test_an_exact_build_does_not_depend_on_the_blas_path(tmp_path, monkeypatch):
    """Version 3 trains with exact products: MKL's cross-vendor branch (COMPATIBLE, another summation order,
    what an AMD CPU's MKL differs by) builds the same weights as its AVX2 branch, where version 2's differ."""
    exact = next(v for v in zoo.RECIPES if zoo.trains_exact(zoo.RECIPES[v]))
    digests: dict[tuple[int, str], dict[str, str]] = {}
    for branch in ("AVX2,STRICT", "COMPATIBLE,STRICT"):
        monkeypatch.setitem(numerics.PINNED_ENV, "MKL_CBWR", branch)
        for version in (2, exact):
            path = zoo.build_zoo(tmp_path / branch, steps_scale=TINY, log=None, evaluate=False, version=version)
            digests[version, branch] = json.loads((path / "zoo.json").read_text())["weights_sha256"]
    assert digests[exact, "AVX2,STRICT"] == digests[exact, "COMPATIBLE,STRICT"]
    assert set(digests[exact, "AVX2,STRICT"]) == set(zoo.ZOO_MODELS)
    assert digests[2, "AVX2,STRICT"]["base"] != digests[2, "COMPATIBLE,STRICT"]["base"]
