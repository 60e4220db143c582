"""M2N2: Model Merging of Natural Niches (Abrantes, Lange, Tang: "Competition and Attraction Improve
Model Fusion", Sakana AI 2025; reference code github.com/SakanaAI/natural_niches).

The algorithm keeps an *archive* of ``pop`` members (default 20) with their per-example scores
``s_ij`` in [0, 1] (member ``i``, training example ``j``; higher is better). Every step:

1. **competition** -- examples are a limited resource shared by the members that solve them:
   ``z_j = (sum_i s_ij) ** alpha`` (a zero sum is replaced by 1), shared fitness
   ``f_i = sum_j s_ij / z_j``. Parent A is drawn with probability ``f_i / sum f``;
2. **attraction** -- parent B is drawn with probability proportional to
   ``sum_j max(0, s_Bj / z_j - s_Aj / z_j)``: partners strong where A is weak and few others are
   (A itself scores 0; when nobody attracts A, B is drawn like A, by shared fitness);
3. **split-point crossover** -- a split point ``s`` over the ordered genes and a mixing weight
   ``w ~ U(0, 1)``: ``child = w A + (1 - w) B`` before ``s`` and ``(1 - w) A + w B`` from ``s`` on
   (the reference code draws ``s`` uniformly in ``[0, dim)`` and uses SLERP with one angle for the
   whole vector; genotypes in the unit cube are mixed linearly, see below);
4. the child is evaluated on every training example and **replaces the weakest**: over the archive plus
   the child, with ``z`` recomputed, the member of lowest shared fitness is replaced by the child unless
   the child itself is the lowest (ties go to the archive member, as in the reference code's ``argmin``).
   While the archive holds fewer than ``pop`` members, a successful child is simply added (the reference
   code's archive starts as ``pop`` zero-score rows, which amounts to the same).

``alpha = 0`` makes ``z = 1``: shared fitness is raw fitness, i.e. a plain fitness-proportional GA
(ablation). Other ablations: ``split=False`` (one mixing weight for the whole vector) and
``attraction=False`` (B drawn independently of A, by shared fitness, like the reference's
``--no_matchmaker``).

**Children of recipes are recipes.** Genotypes live in ``[0, 1]^dim`` and the parameter-space genome
decodes them linearly and gene by gene (``weight = lo + (hi - lo) * x``, the same for densities), with
the genes ordered by layer group (then source model, then weight/density). A child is, per segment
(before/after the split point), a convex combination of its parents' genotypes, so its decoded
coefficients are the same convex combination of the parents' per-group coefficients over the source
models: the child is again a recipe (per-segment coefficients over the sources), never a weight tensor,
and the store holds only recipes. With ``split_granularity`` set to the number of genes per layer group
(``"group"``, which needs ``n_sources``) the split point falls on a layer-group boundary, as in the
paper's model-merging experiments; with 1 (default) it may fall between any two genes.

**Mutation** follows the reference code's rule "mutate only when starting from scratch": when the
archive is seeded with the source models (``init="corners"`` and ``n_sources`` given) children are not
mutated, as in the paper's merging experiments; when it starts from random points every child gets
Gaussian noise of std ``FROM_SCRATCH_MUTATION = 0.1`` (genotype units; the reference uses 0.01 on
weights initialised with std 0.01), clipped back into the cube. ``mutation`` overrides either.
Without mutation children stay inside the per-segment convex hull of the initial points (on ZDT1 with
200 evaluations M2N2 without mutation loses to random search; with 0.1 it beats it on every seed tried).

**Per-example scores.** ``needs_samples = True`` tells the study loop to report results as
``(key, values, samples)`` with ``samples`` the flat list of per-example scores over all training
examples of all objectives, concatenated in objective order, each in [0, 1] with higher better
(clipped into [0, 1]; NaN counts 0). Plain ``(key, values)`` results (or an empty ``samples`` list) fall
back to treating every objective as one "example": objective ``k`` of member ``i`` scores its
normalised rank among the archive plus the candidates being judged,
``s_ik = (#members strictly worse + 0.5 * #ties with others) / (n - 1)`` (best 1, worst 0; minimised and
maximised objectives both handled through ``directions``). Rank scores are recomputed whenever the
archive changes. Which of the two modes is used is fixed by the first successful result
(``scores="auto"``) or forced by the ``scores`` setting; in samples mode a successful result without
samples cannot be placed and is left out of the archive (counted in ``n_unscored``), in values mode
samples are ignored. ``weights`` are not used (M2N2 does not scalarise; its archive keeps niches).

Failed candidates (``None``/NaN/inf values) never enter the archive.

**Niches per candidate.** Every placed result gets a niche (:func:`candidate_niche`, judged against
the archive it met): the examples (in values mode: the objectives) where it holds the largest share of
all members, its shared fitness, whether it entered the archive and whose place it took.
``take_niches()`` hands them over once; the study loop writes them into the store's ``niche`` column.

**Steady state.** No generation barrier: ``ask(n)`` always returns ``n`` proposals, each drawn from the
archive as it stands. The first ``n_init`` proposals are the initial points: with ``init="corners"`` and
``n_sources`` given, one corner per source model first (its weight genes at 1, the other sources' at 0,
density genes at 1: with weight bounds [0, 1] that is the source model alone), then uniform random
points up to ``n_init`` (default ``n_sources``: only the sources, like the paper's runs from two
pre-trained models); ``init="random"`` or no ``n_sources``: ``n_init`` (default ``pop``) random points.
While fewer than two members are in the archive (initial points still out, or all failed) ``ask``
proposes further random points.

**State** (plain JSON): the archive (key, genotype, per-example scores or objective values), the niches
not yet taken, the
outstanding proposals, counters, and numpy's PCG64 state (its 128-bit integers as strings); a fresh
instance loading it continues exactly.

The math is in pure numpy functions (:func:`shared_fitness`, :func:`attraction`,
:func:`select_parents`, :func:`sample_crossover`, :func:`crossover` (and the reference code's
:func:`crossover_slerp`, for raw weights only), :func:`replacement_index`,
:func:`rank_scores`, :func:`m2n2_step_update`) shared by the :class:`M2N2` algorithm and
``bench/m2n2_digits.py``, which runs them on flattened MLP parameter vectors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from evomerge.search.base import Algorithm, Proposal, SearchContext, layout_settings, register

#: default mutation std (genotype units) when the archive starts from random points
FROM_SCRATCH_MUTATION = 0.1

# --------------------------------------------------------------------------------------- pure math


def niche_normalizer(scores: np.ndarray, alpha: float) -> np.ndarray:
    """``z_j = (sum_i s_ij) ** alpha`` with a zero sum replaced by 1; ``scores`` is (members, examples)."""
    total = np.asarray(scores, dtype=float).sum(axis=0)
    total = np.where(total > 0, total, 1.0)
    return total ** float(alpha)


def shared_fitness(scores: np.ndarray, alpha: float) -> np.ndarray:
    """``f_i = sum_j s_ij / z_j`` for every member (row) of ``scores``."""
    s = np.asarray(scores, dtype=float)
    return (s / niche_normalizer(s, alpha)[None, :]).sum(axis=1)


def attraction(scores: np.ndarray, a: int, alpha: float) -> np.ndarray:
    """Attraction of every member as a mate for member ``a``: ``sum_j max(0, s_Bj/z_j - s_aj/z_j)``."""
    s = np.asarray(scores, dtype=float)
    shared = s / niche_normalizer(s, alpha)[None, :]
    return np.maximum(0.0, shared - shared[a][None, :]).sum(axis=1)


def _draw(rng: np.random.Generator, weights: np.ndarray) -> int:
    """Index drawn with probability proportional to ``weights`` (uniform when they sum to 0)."""
    w = np.asarray(weights, dtype=float)
    total = float(w.sum())
    if not total > 0 or not math.isfinite(total):
        return int(rng.integers(len(w)))
    cdf = np.cumsum(w / total)
    u = float(rng.random())
    return int(min(np.searchsorted(cdf, u, side="right"), len(w) - 1))


def select_parents(scores: np.ndarray, alpha: float, rng: np.random.Generator,
                   use_attraction: bool = True) -> tuple[int, int]:
    """Parent A by shared fitness, parent B by attraction to A (or, without attraction, again by shared
    fitness, independently). When no member attracts A (A is at least as good everywhere), B is drawn by
    shared fitness. Returns row indices into ``scores``."""
    s = np.asarray(scores, dtype=float)
    fit = shared_fitness(s, alpha)
    a = _draw(rng, fit)
    if use_attraction:
        att = attraction(s, a, alpha)
        b = _draw(rng, att) if float(att.sum()) > 0 else _draw(rng, fit)
    else:
        b = _draw(rng, fit)
    return a, b


def split_points(dim: int, granularity: int = 1) -> np.ndarray:
    """The allowed split points: multiples of ``granularity`` in ``[0, dim)`` (the reference code draws
    ``s`` in ``[0, dim)``; ``s = 0`` mixes the whole vector with ``1 - w``)."""
    return np.arange(0, int(dim), max(1, int(granularity)))


def sample_crossover(rng: np.random.Generator, dim: int, split: bool = True,
                     granularity: int = 1) -> tuple[int, float]:
    """Draw ``(split point, mixing weight w)``; without ``split`` the split point is ``dim`` (``w`` on
    every gene). The weight is drawn first so that the ablation changes nothing else in the stream."""
    w = float(rng.random())
    if not split:
        return int(dim), w
    pts = split_points(dim, granularity)
    return int(pts[int(rng.integers(len(pts)))]), w


def crossover_coefficients(dim: int, split_point: int, w: float) -> np.ndarray:
    """Per-gene coefficient of parent A: ``w`` before the split point, ``1 - w`` from it on."""
    return np.where(np.arange(int(dim)) < int(split_point), float(w), 1.0 - float(w))


def crossover(a: np.ndarray, b: np.ndarray, split_point: int, w: float) -> np.ndarray:
    """``w A + (1 - w) B`` before ``split_point``, ``(1 - w) A + w B`` from it on (per-segment convex
    combinations; works on genotypes, recipes' coefficients or flattened weights alike)."""
    a = np.asarray(a)
    b = np.asarray(b)
    c = crossover_coefficients(a.shape[-1], split_point, w).astype(a.dtype, copy=False)
    return c * a + (1 - c) * b


def crossover_slerp(a: np.ndarray, b: np.ndarray, split_point: int, w: float) -> np.ndarray:
    """The reference code's crossover on raw weight vectors: SLERP with one angle ``omega`` between the
    whole parent vectors, parameter ``w`` towards A before ``split_point`` and ``1 - w`` from it on
    (coefficients ``sin(t omega) / sin(omega)`` on A and ``sin((1 - t) omega) / sin(omega)`` on B;
    linear when the parents are parallel). Keeps the norm of near-orthogonal parents, which the linear
    crossover shrinks; not used for genotypes (its coefficients do not sum to 1, so the affine decode
    would not commute with it)."""
    a = np.asarray(a)
    b = np.asarray(b)
    a64, b64 = a.astype(np.float64, copy=False), b.astype(np.float64, copy=False)
    na, nb = float(np.linalg.norm(a64)), float(np.linalg.norm(b64))
    if na == 0.0 or nb == 0.0:
        return crossover(a, b, split_point, w)
    omega = math.acos(min(1.0, max(-1.0, float(np.dot(a64, b64)) / (na * nb))))
    so = math.sin(omega)
    if so <= 1e-6:
        return crossover(a, b, split_point, w)
    t = crossover_coefficients(a.shape[-1], split_point, w)
    ca = (np.sin(t * omega) / so).astype(a.dtype, copy=False)
    cb = (np.sin((1 - t) * omega) / so).astype(a.dtype, copy=False)
    return ca * a + cb * b


def replacement_index(archive_scores: np.ndarray, child_scores: np.ndarray, alpha: float) -> int | None:
    """The archive row the child replaces, or ``None`` when the child has the lowest shared fitness of
    archive plus child (``z`` recomputed with the child; ties replace the archive member)."""
    ext = np.vstack([np.asarray(archive_scores, dtype=float),
                     np.asarray(child_scores, dtype=float)[None, :]])
    worst = int(np.argmin(shared_fitness(ext, alpha)))
    return worst if worst < ext.shape[0] - 1 else None


def candidate_niche(scores: np.ndarray, alpha: float) -> dict[str, Any]:
    """The niche of the last row of ``scores`` (a candidate judged against the archive above it): the
    examples where it holds the largest share ``s_cj / z_j`` of all rows (ties included, zero scores
    never), and its shared fitness among them."""
    s = np.asarray(scores, dtype=float)
    shares = s / niche_normalizer(s, alpha)[None, :]
    mine = shares[-1]
    held = (mine > 0) & (mine >= shares.max(axis=0) - 1e-12)
    return {"examples": [int(j) for j in np.flatnonzero(held)], "shared_fitness": float(mine.sum())}


def m2n2_step_update(archive: np.ndarray, scores: np.ndarray, child: np.ndarray, child_scores: np.ndarray,
                     alpha: float, pop: int) -> tuple[np.ndarray, np.ndarray, int | None]:
    """Archive update for array-held archives (the benchmark): append while fewer than ``pop`` members,
    then replace the weakest. Returns (archive, scores, row written or None); arrays are updated in place
    when a row is replaced."""
    if archive.shape[0] < pop:
        return (np.vstack([archive, child[None, :]]), np.vstack([scores, child_scores[None, :]]),
                archive.shape[0])
    i = replacement_index(scores, child_scores, alpha)
    if i is not None:
        archive[i] = child
        scores[i] = child_scores
    return archive, scores, i


def rank_scores(values: np.ndarray) -> np.ndarray:
    """Per-objective normalised ranks in [0, 1] (1 best) of minimisation-form ``values`` (members,
    objectives): ``(#strictly worse + 0.5 * #ties with others) / (n - 1)``; a single member scores 1."""
    v = np.asarray(values, dtype=float)
    n = v.shape[0]
    if n <= 1:
        return np.ones_like(v)
    worse = (v[None, :, :] > v[:, None, :]).sum(axis=1)  # [i, k]: members worse than i on k
    ties = (v[None, :, :] == v[:, None, :]).sum(axis=1) - 1
    return (worse + 0.5 * ties) / (n - 1)


# --------------------------------------------------------------------------------------- algorithm


def _rng_state(rng: np.random.Generator) -> dict[str, Any]:
    st = rng.bit_generator.state
    return {"bit_generator": st["bit_generator"], "state": str(st["state"]["state"]),
            "inc": str(st["state"]["inc"]), "has_uint32": int(st["has_uint32"]),
            "uinteger": str(st["uinteger"])}


def _rng_from_state(r: dict[str, Any], seed: int) -> np.random.Generator:
    if r["bit_generator"] != "PCG64":
        raise ValueError(f"m2n2: unsupported bit generator {r['bit_generator']!r}")
    rng = np.random.Generator(np.random.PCG64(seed))
    rng.bit_generator.state = {"bit_generator": "PCG64",
                               "state": {"state": int(r["state"]), "inc": int(r["inc"])},
                               "has_uint32": int(r["has_uint32"]), "uinteger": int(r["uinteger"])}
    return rng


@register
class M2N2(Algorithm):
    """Model Merging of Natural Niches; see the module docstring."""

    name = "m2n2"
    multi_objective = True  # no scalarisation: the archive keeps niches; the front comes from the store
    generational = False
    needs_samples: ClassVar[bool] = True
    needs_layout: ClassVar[bool] = True
    default_settings = {
        "pop": 20,  # archive size (the paper's code: 20)
        "alpha": 1.0,  # competition exponent; 0 = plain GA (raw fitness)
        "attraction": True,  # False: mate B drawn by shared fitness, independently of A
        "split": True,  # False: one mixing weight for the whole genotype
        "split_granularity": 1,  # split points at multiples of this many genes; "group" = layer groups
        "mutation": None,  # std of Gaussian genotype noise on every child; None: 0 when seeded with
        #                    the source models (corners), FROM_SCRATCH_MUTATION otherwise
        "init": "corners",  # "corners" (one per source, needs n_sources) then random, or "random"
        "n_init": None,  # initial points (None: n_sources when seeded with corners, else pop)
        "n_sources": None,  # source models in the genome (for corners and split_granularity="group")
        "genes_per_source": 1,  # genes per source per layer group (2 with densities: TIES/DARE)
        "group_params": 0,  # genes of each layer group's own after its sources' (e.g. consensus k)
        "scores": "auto",  # "auto", "samples" (per-example) or "values" (rank fallback)
        "max_evals": None,  # done() once this many proposals were handed out
    }

    @classmethod
    def derive_settings(cls, settings: dict[str, Any], context: SearchContext) -> dict[str, Any]:
        # Seeded with each source model alone and split at layer-group boundaries, a child of recipes
        # is a recipe (per-group coefficients); that needs the genome's layout.
        out = layout_settings(settings, context)
        if context.layout is not None:
            out.setdefault("split_granularity", "group")
        return out

    def config(self) -> dict[str, Any]:
        cfg = super().config()
        if not cfg["group_params"]:
            del cfg["group_params"]  # as checkpoints written before the setting existed say it: they resume
        return cfg

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        s = self.settings
        self.pop = int(s["pop"])
        if self.pop < 2:
            raise ValueError(f"m2n2: pop must be >= 2, got {self.pop}")
        self.alpha = float(s["alpha"])
        if not (math.isfinite(self.alpha) and self.alpha >= 0):
            raise ValueError(f"m2n2: alpha must be finite and >= 0, got {s['alpha']}")
        if s["init"] not in ("corners", "random"):
            raise ValueError(f"m2n2: init must be 'corners' or 'random', got {s['init']!r}")
        if s["scores"] not in ("auto", "samples", "values"):
            raise ValueError(f"m2n2: scores must be 'auto', 'samples' or 'values', got {s['scores']!r}")
        seeded = s["init"] == "corners" and s["n_sources"] is not None  # starts from the source models
        if s["mutation"] is None:
            self.mutation = 0.0 if seeded else FROM_SCRATCH_MUTATION
        else:
            self.mutation = float(s["mutation"])
        if not (math.isfinite(self.mutation) and self.mutation >= 0):
            raise ValueError(f"m2n2: mutation must be >= 0, got {s['mutation']}")
        if s["n_init"] is not None:
            self.n_init = int(s["n_init"])
        else:
            self.n_init = int(s["n_sources"]) if seeded else self.pop
        gps = int(s["genes_per_source"])
        extra = int(s["group_params"])
        n_src = None if s["n_sources"] is None else int(s["n_sources"])
        group_genes = None
        if n_src is not None:
            if n_src < 1 or gps < 1 or extra < 0 or self.dim % (n_src * gps + extra):
                raise ValueError(f"m2n2: dim {self.dim} is not a multiple of n_sources {n_src} x "
                                 f"genes_per_source {gps} + group_params {extra}")
            group_genes = n_src * gps + extra
        g = s["split_granularity"]
        if g == "group":
            if group_genes is None:
                raise ValueError("m2n2: split_granularity='group' needs n_sources")
            self.granularity = group_genes
        else:
            self.granularity = int(g)
            if self.granularity < 1:
                raise ValueError(f"m2n2: split_granularity must be >= 1 or 'group', got {g!r}")
        self._corners: list[list[float]] = []
        if s["init"] == "corners" and n_src is not None:
            for src in range(n_src):
                x = np.zeros(self.dim)
                for grp in range(self.dim // group_genes):
                    base = grp * group_genes + src * gps
                    x[base] = 1.0
                for grp in range(self.dim // group_genes):  # density genes (if any) keep everything
                    for other in range(n_src):
                        x[grp * group_genes + other * gps + 1: grp * group_genes + (other + 1) * gps] = 1.0
                    # a group's own params sit mid-range: a source alone does not say what they should be
                    x[(grp + 1) * group_genes - extra: (grp + 1) * group_genes] = 0.5
                self._corners.append([float(v) for v in x])
        self._rng = np.random.Generator(np.random.PCG64(self.seed))
        self._next_key = 0
        self._n_told = 0
        self._n_unscored = 0
        self._mode: str | None = None if s["scores"] == "auto" else str(s["scores"])
        self._n_examples: int | None = None
        self._outstanding: dict[int, dict[str, Any]] = {}  # key -> {"x", "parents"}
        # archive members: {"key", "x", "s"} (samples mode) or {"key", "x", "v"} (values, minimisation)
        self._archive: list[dict[str, Any]] = []
        self._niches: dict[int, dict[str, Any]] = {}  # told since the last take_niches(), by key

    # ------------------------------------------------------------------------ scores
    def archive_scores(self, extra: Sequence[Sequence[float]] = ()) -> np.ndarray:
        """The per-example score matrix of the archive (plus ``extra`` rows: samples, or minimisation
        values in values mode), as the algorithm sees it now."""
        if self._mode == "values":
            rows = [m["v"] for m in self._archive] + [list(e) for e in extra]
            return rank_scores(np.asarray(rows, dtype=float).reshape(len(rows), self.n_obj))
        rows = [m["s"] for m in self._archive] + [list(e) for e in extra]
        return np.asarray(rows, dtype=float).reshape(len(rows), -1)

    def shared_fitness(self) -> list[float]:
        return [float(v) for v in shared_fitness(self.archive_scores(), self.alpha)] if self._archive else []

    # ------------------------------------------------------------------------ ask
    def ask(self, n: int) -> list[Proposal]:
        n = int(n)
        if self.settings["max_evals"] is not None:
            n = max(0, min(n, int(self.settings["max_evals"]) - self._next_key))
        out = []
        scores = self.archive_scores() if len(self._archive) >= 2 else None
        for _ in range(n):
            key = self._next_key
            parents: list[int] = []
            if key < len(self._corners) and key < self.n_init:
                x = np.asarray(self._corners[key])
            elif key < self.n_init or scores is None:
                x = self._rng.random(self.dim)
            else:
                ia, ib = select_parents(scores, self.alpha, self._rng, bool(self.settings["attraction"]))
                sp, w = sample_crossover(self._rng, self.dim, bool(self.settings["split"]), self.granularity)
                a, b = self._archive[ia], self._archive[ib]
                x = crossover(np.asarray(a["x"]), np.asarray(b["x"]), sp, w)
                if self.mutation > 0:
                    x = np.clip(x + self._rng.normal(0.0, self.mutation, self.dim), 0.0, 1.0)
                parents = [int(a["key"]), int(b["key"])]
            self._next_key += 1
            xl = [min(1.0, max(0.0, float(v))) for v in x]
            self._outstanding[key] = {"x": xl, "parents": parents}
            out.append(Proposal(key=key, x=list(xl), parents=parents, generation=key // self.pop))
        return out

    # ------------------------------------------------------------------------ tell
    def tell(self, results: list[tuple]) -> None:
        for res in results:
            if len(res) == 2:
                key, values = res
                samples = None
            elif len(res) == 3:
                key, values, samples = res
            else:
                raise ValueError(f"m2n2: a result is (key, values) or (key, values, samples), got {res!r}")
            key = int(key)
            if key not in self._outstanding:
                continue
            fmin = self.to_min(values)  # validates the number of values
            prop = self._outstanding.pop(key)
            self._n_told += 1
            if fmin is None:
                continue
            has_samples = samples is not None and len(samples) > 0
            if self._mode is None:
                self._mode = "samples" if has_samples else "values"
            if self._mode == "values":
                self._place({"key": key, "x": prop["x"], "v": [float(v) for v in fmin]})
                continue
            if not has_samples:
                self._n_unscored += 1
                continue
            arr = np.asarray(samples, dtype=float).reshape(-1)
            if self._n_examples is None:
                self._n_examples = int(arr.shape[0])
            elif arr.shape[0] != self._n_examples:
                raise ValueError(f"m2n2: {arr.shape[0]} per-example scores, earlier results had "
                                 f"{self._n_examples}")
            arr = np.clip(np.nan_to_num(arr, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)
            self._place({"key": key, "x": prop["x"], "s": [float(v) for v in arr]})

    def _place(self, member: dict[str, Any]) -> None:
        row = member["v"] if self._mode == "values" else member["s"]
        ext = self.archive_scores([row])
        niche = candidate_niche(ext, self.alpha)
        replaced = None
        if len(self._archive) < self.pop:
            self._archive.append(member)
            admitted = True
        else:
            if self._mode == "values":
                worst = int(np.argmin(shared_fitness(ext, self.alpha)))
                idx = worst if worst < len(self._archive) else None
            else:
                idx = replacement_index(self.archive_scores(), np.asarray(row), self.alpha)
            admitted = idx is not None
            if idx is not None:
                replaced = int(self._archive[idx]["key"])
                self._archive[idx] = member
        self._niches[int(member["key"])] = {**niche, "admitted": admitted, "replaced": replaced}

    def take_niches(self) -> dict[int, Any]:
        out, self._niches = self._niches, {}
        return out

    # ------------------------------------------------------------------------ bookkeeping
    @property
    def outstanding(self) -> list[int]:
        return sorted(self._outstanding)

    @property
    def archive(self) -> list[dict[str, Any]]:
        """The archive members (key, genotype ``x``, scores ``s`` or minimisation values ``v``)."""
        return self._archive

    def done(self) -> bool:
        me = self.settings["max_evals"]
        return me is not None and self._next_key >= int(me)

    def state_dict(self) -> dict[str, Any]:
        return {
            **self._header(),
            "next_key": self._next_key,
            "n_told": self._n_told,
            "n_unscored": self._n_unscored,
            "mode": self._mode,
            "n_examples": self._n_examples,
            "outstanding": [{"key": k, "x": list(v["x"]), "parents": list(v["parents"])}
                            for k, v in sorted(self._outstanding.items())],
            "archive": [{k: (list(v) if isinstance(v, list) else v) for k, v in m.items()}
                        for m in self._archive],
            "rng": _rng_state(self._rng),
            "niches": [[k, v] for k, v in sorted(self._niches.items())],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_header(state)
        self._rng = _rng_from_state(state["rng"], self.seed)
        self._next_key = int(state["next_key"])
        self._n_told = int(state["n_told"])
        self._n_unscored = int(state.get("n_unscored", 0))
        self._mode = state["mode"]
        self._n_examples = None if state["n_examples"] is None else int(state["n_examples"])
        self._outstanding = {int(o["key"]): {"x": [float(v) for v in o["x"]],
                                             "parents": [int(p) for p in o["parents"]]}
                             for o in state["outstanding"]}
        self._niches = {int(k): dict(v) for k, v in state.get("niches", [])}
        self._archive = []
        for m in state["archive"]:
            mem: dict[str, Any] = {"key": int(m["key"]), "x": [float(v) for v in m["x"]]}
            if "s" in m:
                mem["s"] = [float(v) for v in m["s"]]
            else:
                mem["v"] = [float(v) for v in m["v"]]
            self._archive.append(mem)
