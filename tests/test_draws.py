"""Counter-based draws of the random drops: uniform, independent, position-pure, the same eager and fused."""

from __future__ import annotations

import pytest
import torch

from evomerge.merge import Materializer, draws
from evomerge.recipe import LayerGroup, Recipe

try:
    from fixtures_models import make_tiny_llama_family
except ImportError:  # tests/ collected as a package
    from tests.fixtures_models import make_tiny_llama_family


def test_uniform_and_independent():
    u = draws.uniforms(0, "model.layers.0.mlp.up_proj.weight", 3, 0, 1 << 20)
    assert u.dtype == torch.float32 and u.shape == (3, 1 << 20)
    assert float(u.min()) >= 0 and float(u.max()) < 1
    assert torch.equal(u * 65536, (u * 65536).round())  # a 2^-16 grid
    for row in u:
        assert abs(float(row.mean()) - 0.5) < 2e-3 and abs(float(row.var()) - 1 / 12) < 2e-3
        hist = torch.histc(row, bins=16, min=0, max=1) / row.numel()
        assert float((hist - 1 / 16).abs().max()) < 3e-3
    c = torch.corrcoef(u)
    assert float((c - torch.eye(3)).abs().max()) < 0.01  # the two halves of a pair, and across pairs
    adj = torch.corrcoef(torch.stack([u[0, :-1], u[0, 1:]]))[0, 1]
    assert abs(float(adj)) < 0.01  # neighbours


def test_pure_function_of_position_seed_and_name():
    full = draws.uniforms(5, "w", 4, 0, 10_000)
    assert torch.equal(draws.uniforms(5, "w", 4, 1234, 5678), full[:, 1234:5678])
    assert torch.equal(draws.uniforms(5, "w", 3, 0, 10_000), full[:3])  # a source's draws ignore K
    assert not torch.equal(draws.uniforms(6, "w", 4, 0, 10_000), full)
    assert not torch.equal(draws.uniforms(5, "v", 4, 0, 10_000), full)


def test_segments_take_their_own_keys(monkeypatch):
    monkeypatch.setattr(draws, "SEGMENT", 1000)
    u = draws.uniforms(1, "w", 2, 0, 2500)
    assert torch.equal(u[:, 1000:2000], draws.uniforms(1, "w", 2, 1000, 2000))
    assert not torch.equal(u[:, :1000], u[:, 1000:2000])  # same positions, another segment's key
    pos = torch.arange(500, dtype=torch.int32)
    keys = draws.noise_keys(1, "w", 2, segment=2)
    assert torch.equal(draws.source_uniform(pos, keys, 1), u[1, 2000:])


def test_integer_keep_threshold_is_the_float_comparison():
    bits = torch.arange(1 << 16, dtype=torch.int32)
    u = bits.to(torch.float32) * 2.0**-16
    edge = [0.0, 1.0, 2.0**-16, 1 - 2.0**-16, 0.5, -0.3, 1.7, float("nan"), float("inf"), -float("inf"), 1e-40]
    ps = torch.cat([torch.tensor(edge), torch.rand(300, generator=torch.Generator().manual_seed(0))])
    near = torch.tensor([0.25, 0.5, 0.75])  # the float32 neighbours of exact grid points
    ps = torch.cat([ps, torch.nextafter(near, torch.zeros(3)), torch.nextafter(near, torch.ones(3))])
    thr = draws.keep_threshold(ps)
    assert thr.dtype == torch.int32
    for p, t in zip(ps.tolist(), thr.tolist(), strict=True):
        want = u < torch.tensor(p, dtype=torch.float32)
        assert torch.equal(bits < t, want), p
    assert torch.equal(
        draws.source_bits(torch.arange(5000, dtype=torch.int32), draws.noise_keys(2, "w", 3), 2).float() * 2.0**-16,
        draws.uniforms(2, "w", 3, 0, 5000)[2],
    )


def test_compiled_draws_are_bit_identical():
    from evomerge.merge import kernels

    assert kernels.available()
    keys = draws.noise_keys(3, "x", 3)
    n = 70_001
    ref = draws.uniforms(3, "x", 3, 0, n)
    pos = torch.arange(n, dtype=torch.int32)
    for k in range(3):
        got = torch.compile(lambda pos, keys, k=k: draws.source_uniform(pos, keys, k), dynamic=True)(pos, keys)
        assert torch.equal(got, ref[k]), k
        bits = torch.compile(lambda keys, k=k: kernels._bits(keys, k, n), dynamic=True)(keys)
        assert torch.equal(bits.float() * 2.0**-16, ref[k]), k


@pytest.mark.parametrize("method", ["dare", "dare_ties"])
def test_fused_kernels_draw_per_segment(tmp_path, monkeypatch, method):
    """A tensor spanning several segments: the fused path (one call per segment, one key each) keeps
    exactly the entries the eager path keeps."""
    monkeypatch.setattr(draws, "SEGMENT", 4096)
    base, experts = make_tiny_llama_family(tmp_path, n_experts=2, seed=2, num_hidden_layers=1, vocab_size=512)
    eager, fused = Materializer(base, experts), Materializer(base, experts, fused=True)
    name = "model.embed_tokens.weight"
    assert eager.deltas[name][0].numel() > 3 * 4096
    r = Recipe(
        base=base,
        sources=experts,
        method=method,
        seed=9,
        params={"rescale": "none"},
        groups=[LayerGroup(name="all", kind="all", weights=[1.0, 0.0], densities=[0.4, 0.9])],
    )
    a, b = eager.merged_tensor(r, name), fused.merged_tensor(r, name)
    b0 = eager.base[name]
    kept_eager, kept_fused = a != b0, b != b0  # weight 0 on source 1: a change is source 0's kept entry
    assert torch.equal(kept_eager, kept_fused)
    assert abs(float(kept_eager.float().mean()) - 0.4) < 0.03
