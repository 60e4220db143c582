"""M2N2 (evomerge.search.m2n2): the niche math on hand cases, crossover, replacement, ablations, the
per-example (3-tuple) interface and exact resume. The shared suite in test_algorithms.py runs it too."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from evomerge.genomes.parameter_space import ParameterSpaceGenome
from evomerge.search import M2N2, REGISTRY, make_algorithm, restore_algorithm
from evomerge.search.m2n2 import (
    attraction,
    crossover,
    crossover_coefficients,
    crossover_slerp,
    m2n2_step_update,
    niche_normalizer,
    rank_scores,
    replacement_index,
    sample_crossover,
    select_parents,
    shared_fitness,
    split_points,
)
from evomerge.space import load_space

# three members, four examples: 0 and 1 solve the same two examples, 2 alone solves a third,
# nobody solves the fourth
S = np.array([[1.0, 1.0, 0.0, 0.0],
              [1.0, 1.0, 0.0, 0.0],
              [0.0, 0.0, 1.0, 0.0]])


# ------------------------------------------------------------------------------------ niche math
def test_shared_fitness_hand_case():
    z = niche_normalizer(S, 1.0)
    assert z.tolist() == [2.0, 2.0, 1.0, 1.0]  # the unsolved example's 0 is replaced by 1
    # raw fitness 2, 2, 1; shared: the two duplicates split their examples
    assert shared_fitness(S, 1.0).tolist() == [1.0, 1.0, 1.0]
    # alpha = 0: z = 1, shared fitness is raw fitness (plain GA)
    assert niche_normalizer(S, 0.0).tolist() == [1.0] * 4
    assert shared_fitness(S, 0.0).tolist() == S.sum(1).tolist()
    # alpha = 2 punishes crowding harder
    assert shared_fitness(S, 2.0).tolist() == [0.5, 0.5, 1.0]
    # no NaN when nothing is solved
    assert shared_fitness(np.zeros((3, 4)), 1.0).tolist() == [0.0, 0.0, 0.0]


def test_attraction_favours_partners_strong_where_a_is_weak():
    att = attraction(S, 0, 1.0)
    assert att[0] == 0.0  # nobody attracts itself
    assert att[1] == 0.0  # a duplicate of A brings nothing
    assert att[2] == pytest.approx(1.0)  # strong on the example A misses, which few others solve
    # a newcomer strong where A is weak and where nobody else is strong is A's most attractive mate
    ext = np.vstack([S, [0.0, 0.0, 1.0, 1.0]])
    for a in range(2):
        scores = attraction(ext, a, 1.0)
        assert int(np.argmax(scores)) == 3 and scores[3] == pytest.approx(1.5) and scores[2] == 0.5
    # crowding lowers the attraction of an example: with alpha = 1 solving a niche shared by two is
    # worth half as much as one solved alone
    crowd = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    att = attraction(crowd, 0, 1.0)
    assert att[1] == pytest.approx(0.5) and att[3] == pytest.approx(1.0)
    assert attraction(crowd, 0, 0.0)[1] == pytest.approx(1.0)  # no sharing with alpha = 0


def test_select_parents_distributions():
    rng = np.random.default_rng(0)
    scores = np.array([[1.0, 1.0, 1.0, 0.0],  # strong generalist
                       [1.0, 1.0, 0.0, 0.0],  # dominated by member 0
                       [0.0, 0.0, 0.0, 1.0],  # the only one solving example 3
                       [0.0, 0.0, 0.0, 0.0]])  # solves nothing
    counts_a = np.zeros(4)
    mates_of_0 = np.zeros(4)
    for _ in range(3000):
        a, b = select_parents(scores, 1.0, rng)
        counts_a[a] += 1
        if a == 0:
            mates_of_0[b] += 1
    fit = shared_fitness(scores, 1.0)
    assert counts_a[3] == 0  # zero shared fitness is never picked
    assert np.allclose(counts_a / counts_a.sum(), fit / fit.sum(), atol=0.03)
    assert mates_of_0[2] == mates_of_0.sum()  # only member 2 attracts member 0
    # without attraction B follows shared fitness, independently of A
    mates = np.zeros(4)
    for _ in range(3000):
        a, b = select_parents(scores, 1.0, rng, use_attraction=False)
        mates[b] += a == 0
    assert mates[1] > 0 and mates[0] > 0 and mates[3] == 0
    # A attracted by nobody (dominates everyone): B falls back to shared fitness, no NaN
    dom = np.array([[1.0, 1.0], [1.0, 0.0]])
    for _ in range(50):
        a, b = select_parents(dom, 1.0, rng)
        assert a in (0, 1) and b in (0, 1)


# ------------------------------------------------------------------------------------ crossover
def test_crossover_is_per_segment_convex_combination():
    rng = np.random.default_rng(1)
    a, b = rng.random(10), rng.random(10)
    child = crossover(a, b, 4, 0.3)
    assert np.allclose(child[:4], 0.3 * a[:4] + 0.7 * b[:4])
    assert np.allclose(child[4:], 0.7 * a[4:] + 0.3 * b[4:])
    assert np.allclose(crossover(a, b, 10, 0.3), 0.3 * a + 0.7 * b)  # no split point
    assert np.allclose(crossover(a, b, 0, 0.3), 0.7 * a + 0.3 * b)
    assert crossover_coefficients(5, 2, 0.25).tolist() == [0.25, 0.25, 0.75, 0.75, 0.75]
    # split points on layer-group boundaries
    assert split_points(12, 4).tolist() == [0, 4, 8]
    for _ in range(50):
        sp, w = sample_crossover(rng, 12, True, 4)
        assert sp % 4 == 0 and 0 <= sp < 12 and 0 <= w < 1
        sp, w = sample_crossover(rng, 12, False, 4)
        assert sp == 12


def test_reference_slerp_crossover():
    a, b = np.array([1.0, 0.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0, 0.0])  # orthogonal
    mid = crossover_slerp(a, b, 4, 0.5)
    assert np.linalg.norm(mid) == pytest.approx(1.0)  # the linear crossover would give 0.707
    assert np.linalg.norm(crossover(a, b, 4, 0.5)) == pytest.approx(np.sqrt(0.5))
    assert np.allclose(crossover_slerp(a, b, 4, 1.0), a) and np.allclose(crossover_slerp(a, b, 4, 0.0), b)
    c = crossover_slerp(a * 2, b * 2, 2, 0.3)  # per segment: t = 0.3 on A before, 0.7 after
    assert c[0] == pytest.approx(2 * np.sin(0.3 * np.pi / 2)) and c[1] == pytest.approx(2 * np.sin(0.7 * np.pi / 2))
    assert np.allclose(crossover_slerp(a, 3 * a, 2, 0.3), crossover(a, 3 * a, 2, 0.3))  # parallel: linear


def test_children_of_recipes_are_recipes(tmp_path: Path):
    """A child genotype decodes to per-segment convex combinations of the parents' recipes'
    coefficients, split on a layer-group boundary."""
    (tmp_path / "space.yaml").write_text("""
base_model: org/base
models: [org/a, org/b]
genome: {method: dare_ties, layer_groups: 2, num_layers: 4}
objectives:
  - {name: x, kind: cost, measure: params}
budget: 10
""")
    genome = ParameterSpaceGenome(load_space(tmp_path / "space.yaml"))
    assert genome.dim == 16  # 4 groups x 2 sources x (weight, density)
    algo = make_algorithm("m2n2", dim=genome.dim, directions=["maximize"], seed=3, n_sources=2,
                          genes_per_source=2, split_granularity="group")
    assert algo.granularity == 4 and algo.mutation == 0.0 and algo.n_init == 2
    corners = algo.ask(2)
    for src, p in enumerate(corners):  # each source model alone, keeping every delta
        r = genome.decode(p.x)
        for g in r.groups:
            assert g.weights == [1.0 if s == src else 0.0 for s in range(2)]
            assert g.densities == [1.0, 1.0]
    rng = np.random.default_rng(0)
    algo.tell([(p.key, [0.5], rng.random(30).round().tolist()) for p in corners])
    # a third member from a random genotype so that crossovers are not all between the corners
    extra = algo.ask(6)
    by_key = {p.key: p.x for p in corners}
    for p in extra:
        by_key[p.key] = p.x
        assert len(p.parents) == 2
        xa, xb = np.asarray(by_key[p.parents[0]]), np.asarray(by_key[p.parents[1]])
        child = np.asarray(p.x)
        ra, rb, rc = (genome.decode(list(v)) for v in (xa, xb, child))
        # find w and the split group: every group is (w, 1-w) or (1-w, w) of the parents' coefficients
        coefs = []
        for ga, gb, gc in zip(ra.groups, rb.groups, rc.groups, strict=True):
            ca, cb, cc = (np.array(g.weights + g.densities) for g in (ga, gb, gc))
            if np.allclose(ca, cb):
                coefs.append(None)
                continue
            k = int(np.argmax(np.abs(ca - cb)))
            lam = (cc[k] - cb[k]) / (ca[k] - cb[k])
            assert np.allclose(cc, lam * ca + (1 - lam) * cb)  # a convex combination within the group
            assert -1e-9 <= lam <= 1 + 1e-9
            coefs.append(lam)
        known = [c for c in coefs if c is not None]
        # at most two distinct mixing coefficients, w then 1 - w
        assert len({round(c, 9) for c in known}) <= 2
        if len({round(c, 9) for c in known}) == 2:
            assert pytest.approx(known[0] + known[-1]) == 1.0



def test_group_params_follow_their_group(tmp_path: Path):
    """An operator with searchable group params (consensus k) adds genes after each group's sources':
    M2N2 takes them from the genome's layout, seeds corners with them mid-range and splits on groups."""
    from evomerge.run import algorithm_settings
    from evomerge.search.base import GenomeLayout, SearchContext

    (tmp_path / "space.yaml").write_text("""
base_model: org/base
models: [org/a, org/b]
genome: {method: consensus, layer_groups: 1, num_layers: 4}
objectives:
  - {name: x, kind: cost, measure: params}
algorithm: {name: m2n2}
""")
    space = load_space(tmp_path / "space.yaml")
    genome = ParameterSpaceGenome(space)
    assert genome.genes_per_group == 2 * 2 + len(genome.group_genes) and genome.group_genes
    settings = algorithm_settings(space, genome)
    assert settings["group_params"] == len(genome.group_genes)
    algo = make_algorithm("m2n2", dim=genome.dim, directions=["maximize"], seed=0, **settings)
    assert algo.granularity == genome.genes_per_group
    for src, p in enumerate(algo.ask(2)):
        for g in genome.decode(p.x).groups:
            assert g.weights == [1.0 if s == src else 0.0 for s in range(2)] and g.densities == [1.0, 1.0]
    # a genome without group params leaves the setting out of the config, as old checkpoints have it
    plain = M2N2.derive_settings({}, SearchContext(bounded=(True,), layout=GenomeLayout(2, 2)))
    assert "group_params" not in make_algorithm("m2n2", dim=8, directions=["maximize"], seed=0, **plain).config()

# ------------------------------------------------------------------------------------ replacement
def test_replacement_only_when_better():
    arch = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    assert replacement_index(arch, np.array([0.0, 0.0, 0.0]), 1.0) is None  # worse than everybody
    assert replacement_index(arch, np.array([0.0, 0.0, 1.0]), 1.0) is not None  # a new niche wins
    # a duplicate of the strongest member shares its examples with it: with alpha = 1 the duplicate
    # and the original are both weakened, and the weakest row is replaced only if it is not the child
    idx = replacement_index(arch, np.array([1.0, 1.0, 1.0]), 1.0)
    assert idx is not None
    # alpha = 0: raw fitness decides
    assert replacement_index(arch, np.array([1.0, 0.0, 0.0]), 0.0) == 0  # tie: archive member goes
    assert replacement_index(arch, np.array([0.0, 0.0, 0.0]), 0.0) is None
    # the array helper appends while the archive is not full
    params = np.zeros((0, 2))
    scores = np.zeros((0, 3))
    params, scores, row = m2n2_step_update(params, scores, np.ones(2), np.ones(3), 1.0, pop=2)
    assert row == 0 and params.shape == (1, 2)


def _full_archive(**settings):
    settings.setdefault("mutation", 0.0)
    algo = make_algorithm("m2n2", dim=4, directions=["maximize"], seed=0, pop=3, **settings)
    props = algo.ask(3)
    samples = [[1, 1, 1, 0, 0, 0], [1, 1, 0, 1, 0, 0], [0, 0, 0, 0, 1, 0]]
    algo.tell([(p.key, [float(np.mean(s))], s) for p, s in zip(props, samples, strict=True)])
    return algo


def test_algorithm_replaces_weakest_only_when_child_is_better():
    algo = _full_archive()
    before = json.dumps(algo.archive)
    p = algo.ask(1)[0]
    algo.tell([(p.key, [0.0], [0, 0, 0, 0, 0, 0])])  # worse than everybody
    assert json.dumps(algo.archive) == before
    p = algo.ask(1)[0]
    algo.tell([(p.key, [0.5], [0, 0, 1, 1, 0, 1])])  # a new niche (example 5) and shares of two more
    keys = [m["key"] for m in algo.archive]
    assert p.key in keys and 2 not in keys  # the member with one example went
    niches = algo.take_niches()
    assert niches[p.key] == {"examples": [2, 3, 5], "shared_fitness": pytest.approx(2.0), "admitted": True,
                             "replaced": 2}
    assert niches[p.key - 1]["admitted"] is False and niches[p.key - 1]["examples"] == []
    assert algo.take_niches() == {}  # handed over once
    # failures and unscored results never enter the archive
    before = json.dumps(algo.archive)
    q = algo.ask(2)
    algo.tell([(q[0].key, None), (q[1].key, [0.9])])
    assert json.dumps(algo.archive) == before and algo.state_dict()["n_unscored"] == 1


def test_rank_fallback_for_plain_values():
    # minimisation values: member 0 best on objective 0, member 2 best on objective 1
    v = np.array([[0.0, 3.0], [1.0, 2.0], [2.0, 1.0], [2.0, 5.0]])
    r = rank_scores(v)
    assert r[:, 0].tolist() == pytest.approx([1.0, 2 / 3, 1 / 6, 1 / 6])
    assert r[:, 1].tolist() == pytest.approx([1 / 3, 2 / 3, 1.0, 0.0])
    algo = make_algorithm("m2n2", dim=2, directions=["minimize", "maximize"], seed=0, pop=2)
    props = algo.ask(3)
    algo.tell([(props[0].key, [0.0, 1.0]), (props[1].key, [1.0, 2.0])])
    assert algo.state_dict()["mode"] == "values"
    algo.tell([(props[2].key, [5.0, 0.0])])  # worst on both: not kept
    assert [m["key"] for m in algo.archive] == [0, 1]


# ------------------------------------------------------------------------------------ ablations
def _children(algo, n=40):
    return [(p.parents, p.x) for p in algo.ask(n)]


def test_ablation_switches_change_behaviour():
    base = _children(_full_archive())
    assert base == _children(_full_archive())
    for kw in ({"alpha": 0.0}, {"split": False}, {"attraction": False}):
        assert _children(_full_archive(**kw)) != base, kw
    # without a split point the child is one convex combination of its parents on every gene
    algo = _full_archive(split=False)
    xs = {m["key"]: np.asarray(m["x"]) for m in algo.archive}
    for parents, x in _children(algo):
        a, b = xs[parents[0]], xs[parents[1]]
        d = a - b
        lam = (np.asarray(x) - b)[np.abs(d) > 1e-9] / d[np.abs(d) > 1e-9]
        assert np.allclose(lam, lam[0])
    # attraction: every member is attracted by another, so nobody is mated with itself
    algo = _full_archive()
    for parents, _ in _children(algo, 200):
        assert parents[0] != parents[1]
    algo = _full_archive(attraction=False)
    assert any(p[0] == p[1] for p, _ in _children(algo, 200))


def test_settings_validation_and_registry():
    assert REGISTRY["m2n2"] is M2N2 and M2N2.needs_samples and M2N2.needs_layout and not M2N2.generational
    with pytest.raises(ValueError):
        make_algorithm("m2n2", dim=4, directions=["maximize"], seed=0, pop=1)
    with pytest.raises(ValueError):
        make_algorithm("m2n2", dim=4, directions=["maximize"], seed=0, split_granularity="group")
    with pytest.raises(ValueError):
        make_algorithm("m2n2", dim=5, directions=["maximize"], seed=0, n_sources=2)
    algo = make_algorithm("m2n2", dim=4, directions=["maximize"], seed=0)
    assert algo.mutation == pytest.approx(0.1) and algo.n_init == 20  # from scratch
    props = algo.ask(2)
    algo.tell([(props[0].key, [0.5], [1, 0, 1])])
    with pytest.raises(ValueError):
        algo.tell([(props[1].key, [0.5], [1, 0])])  # a different number of examples is a bug


# ------------------------------------------------------------------------------------ determinism and resume
def toy_samples(x):
    """Per-example scores of a toy 'model' x in [0,1]^6 on 12 examples: example j is solved to the
    degree gene j % 6 is close to a per-example target."""
    targets = np.linspace(0.05, 0.95, 12)
    x = np.asarray(x)
    return np.clip(1.0 - 3.0 * np.abs(x[np.arange(12) % 6] - targets), 0.0, 1.0)


def samples_run(steps, interrupt_after=(), seed=0, **settings):
    rng = random.Random(7)
    algo = make_algorithm("m2n2", dim=6, directions=["maximize"], seed=seed, pop=6, **settings)
    pool, trace = [], []
    for step in range(steps):
        props = algo.ask(rng.randint(1, 4))
        trace.append([(p.key, p.x, p.parents) for p in props])
        pool.extend(props)
        rng.shuffle(pool)
        k = rng.randint(1, len(pool))
        told, pool = pool[:k], pool[k:]
        res = []
        for p in told:
            if p.key % 11 == 4:
                res.append((p.key, None))
            else:
                s = toy_samples(p.x)
                res.append((p.key, [float(s.mean())], s.tolist()))
        if rng.random() < 0.3:
            res.append((told[0].key, [1.0], [1.0] * 12))  # duplicate report: ignored
        algo.tell(res)
        if step in interrupt_after:
            state = json.loads(json.dumps(algo.state_dict(), allow_nan=False))
            algo = restore_algorithm(state)
    return trace, algo


def test_deterministic_and_resume_exact_with_samples():
    ref, algo = samples_run(50)
    assert algo.state_dict()["mode"] == "samples" and algo.state_dict()["n_examples"] == 12
    assert samples_run(50)[0] == ref
    assert samples_run(50, seed=1)[0] != ref
    for points in ({0}, {9, 10, 33}, set(range(50))):
        assert samples_run(50, interrupt_after=points)[0] == ref


def test_improves_on_per_example_toy():
    trace, algo = samples_run(120)
    xs = [x for step in trace for _, x, _ in step]
    first = max(toy_samples(x).mean() for x in xs[:6])
    best = max(toy_samples(x).mean() for x in xs)
    assert best > first + 0.1
