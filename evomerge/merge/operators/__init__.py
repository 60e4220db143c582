"""Merge operators: pure per-tensor functions, one module per operator (or family), and their registry.

Every module of this package (but the ``_``-private helpers) is imported below and registers an
:class:`OperatorSpec`; adding an operator is one new file here. What a spec declares is the one place
the rest of evomerge reads: the search space's allowed methods and the genome's genes, what the
materializer precomputes, the fused kernel that runs it, and how it translates to mergekit.

To add an operator: write ``evomerge/merge/operators/NAME.py`` with the tensor function (the signature
below) and a ``register(OperatorSpec(...))`` call naming its source genes, params (with ``param_bounds``
for the ones a search evolves per layer group), precomputation (``sparsify``/``context``) and mergekit
name and defaults; ``tests/test_operator_registry.py`` then checks it. A fused kernel is optional
(``fused=``, a :class:`Plan` for :mod:`evomerge.merge.kernels`).

Notation: ``theta0`` is the base tensor, ``tau_t = theta_t - theta0`` the task vector of source
``t``, ``w_t`` its weight and ``d_t`` its density. Every operator has the signature::

    fn(base, deltas, weights, densities=None, *, generator=None, thresholds=None, noise=None,
       workspace=None, **params)

- ``base``: the base tensor (any float dtype, any shape).
- ``deltas``: the K task vectors, stacked ``K x base.shape`` (or a sequence of K tensors).
- ``weights``: ``Tensor[K]`` (or a sequence of floats).
- ``densities``: ``Tensor[K]`` or ``None`` (``None`` means 1 for every source).
- ``generator``: seeds the random operators (DARE) when no ``noise`` is given.
- ``thresholds`` / ``noise``: optional precomputed inputs from the :class:`~evomerge.merge.Materializer`
  (the magnitude threshold of each source at its density, or uniform draws in [0, 1) shaped like
  ``deltas``); an operator computes them itself when they are absent, so a pure call and a
  materializer call give the same result.
- ``params``: the method-wide parameters (``lambda``, ``normalize``, ``rescale``...), defaults in the
  operator's :class:`OperatorSpec`.
- ``workspace``: an optional :class:`Workspace` of scratch buffers (the materializer's hot loop); the
  result may then live in the workspace.
- context an operator declares in its spec (:data:`CONTEXTS`): ``layer`` / ``num_layers`` (LiNeS,
  WIDEN), ``name``, ``fisher`` (``K x shape`` diagonal Fisher), ``source_tensor`` (passthrough), and
  ``ranks`` (DELLA's |tau| ranks, precomputed like ``thresholds``). Operators marked ``whole`` need
  the whole tensor (SVD, norms, sorts); the others are elementwise given these inputs and stream in
  chunks.

The result has the base's dtype and shape; the arithmetic is done in float32 (float64 stays float64).

Conventions follow mergekit 0.1.5's generalized task arithmetic and sparsification unless an
operator's docstring says otherwise:

- weights multiply the (sparsified) task vectors *before* the sign election, so a negative weight
  flips a task vector's vote;
- TIES elects the sign of the sum of the weighted, trimmed task vectors (mergekit's ``"sum"``
  consensus; a sum of exactly 0 elects +), and a zero entry (trimmed or untouched) never "agrees";
- ``normalize`` divides by the sum of the weights of the entries that were merged (per entry for
  TIES, per tensor otherwise); a zero divisor becomes 1, for task arithmetic a divisor with
  ``|sum| < 1e-8`` becomes 1;
- ``lambda`` scales the merged task vector after normalisation.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from evomerge.merge.operators._common import (
    Workspace,
    _band,
    breadcrumb_thresholds,
    della_keep_prob,
    della_ranks,
    magnitude_thresholds,
    trim_count,
)
from evomerge.merge.operators._fused import KERNELS, Plan

if TYPE_CHECKING:
    from torch import Tensor


__all__ = [
    "ALIASES",
    "CONTEXTS",
    "KERNELS",
    "MERGEKIT_DROP",
    "OPERATORS",
    "REQUIRED",
    "SPARSIFY",
    "OperatorSpec",
    "Plan",
    "Workspace",
    "breadcrumb_thresholds",
    "della_keep_prob",
    "della_ranks",
    "get_operator",
    "magnitude_thresholds",
    "register",
    "resolve_params",
    "trim_count",
    "_band",
]

#: what an operator can ask the materializer for, beyond base, task vectors, weights and densities:
#: ``layer`` (``layer``: block index / "embed" / "head", and ``num_layers``), ``name`` (the tensor's
#: checkpoint name), ``whole`` (the whole tensor at once: no chunked streaming), ``fisher`` (``K x
#: shape`` diagonal Fisher of each source, computed from data), ``source_tensor`` (the selected
#: source's tensor as stored).
CONTEXTS = frozenset({"layer", "name", "whole", "fisher", "source_tensor"})

#: what the materializer precomputes per tensor (an operator's ``sparsify``): ``magnitude`` (top-k
#: threshold from a sorted-|tau| index), ``outliers`` (a breadcrumbs band, same index), ``random``
#: (uniform draws for a DARE mask), ``della`` (uniform draws and |tau| ranks from a cumulative histogram).
SPARSIFY = (None, "magnitude", "outliers", "random", "della")

#: what a mergekit export of a recipe that drops entries (some density below 1) is worth: ``exact``
#: (deterministic sparsification, mergekit's), ``distribution`` (random masks that mergekit draws from
#: its own RNG: equal in distribution, a note says so), ``none`` (not expressible: such a recipe is not
#: exported).
MERGEKIT_DROP = ("exact", "distribution", "none")


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


#: a mergekit parameter with no default there (mergekit refuses a config without it).
REQUIRED: Any = _Required()

#: a searchable parameter's ``(low, high)``, or a function of the number of sources giving it; integer
#: bounds make an integer gene.
Bounds = tuple[float, float] | Callable[[int], tuple[float, float]]


@dataclass(frozen=True)
class OperatorSpec:
    """What a merge operator needs, which genes it reads, and how it runs fast and exports.

    Genes:
    ``source_genes``: per-source genes read from each LayerGroup (``weight``, ``density``).
    ``params``: method-wide parameters and their defaults (``Recipe.params`` overrides them).
    ``group_params``: the params a layer group may override (e.g. SLERP's ``t``); the materializer
    reads them from a group's ``params`` mapping when the recipe's groups carry one.
    ``param_bounds``: the group params a search evolves, one gene per layer group each, with their
    bounds (integer bounds decode to integers: consensus ``k``, passthrough ``source``).

    Precomputation and inputs:
    ``sparsify``: what the materializer precomputes per tensor (see :data:`SPARSIFY`). Operators that
    wrap a base merge (``base_method`` param) take that method's needs (:meth:`resolved`).
    ``context``: extra inputs (see :data:`CONTEXTS`); ``fisher`` means the operator needs data.
    ``stats`` / ``linear``: for operators whose whole-tensor statistics do not depend on the genes
    (SLERP's angle, Model Stock's cosine): ``stats(base, deltas)`` is computed once per tensor and
    ``linear(stats, k, **params)`` turns it into ``(bscale, coefs)`` with merged ``= bscale * base +
    sum_i coefs_i * tau_i`` (or ``None`` when these params need the operator itself), so a candidate
    streams like task arithmetic instead of taking the whole tensor at once.
    ``fused``: ``fused(params, weights, densities, drawn) -> Plan | None``, the fused/native kernel
    call for one group's genes (:class:`Plan`), ``None`` where the eager operator must run.

    Sources: ``needs_base`` (``linear`` only uses the base as an origin), ``min_sources`` /
    ``max_sources``.

    mergekit (what :mod:`evomerge.merge.mergekit_io` and :mod:`~evomerge.merge.mergekit_export` read):
    ``mergekit_method``, the mergekit 0.1.5 method with the same semantics;
    ``mergekit_defaults``, its method-wide parameters and their defaults there (they differ from
    evomerge's for some methods, so a translation states them; :data:`REQUIRED` where mergekit has none,
    SLERP's ``t``); each is also an evomerge param of the same name, or absent here (then the export
    writes mergekit's default);
    ``mergekit_inputs``, its per-model parameters: mergekit name -> ``(evomerge name, mergekit default)``,
    the evomerge name a source gene (``weight``, ``density``) or a method-wide param that every model
    must then agree on (breadcrumbs' ``gamma``, DELLA's ``epsilon``); passthrough's ``scale`` is kept as
    the weight, which a layer slice of a stored-tensor operator reads as its scale;
    ``mergekit_fixed``, evomerge params mergekit does not expose, with the value mergekit always uses
    (a recipe with another value does not export);
    ``mergekit_rescale``, evomerge's ``rescale`` values for mergekit's ``rescale: true`` and ``false``
    (any other value, the 1/p rule, has no counterpart and exports only when nothing is dropped);
    ``mergekit_drop``, what an export that drops entries is worth (:data:`MERGEKIT_DROP`);
    ``mergekit_models``, how many models mergekit merges beside the base (per slice), ``None`` for any;
    where ``max_sources`` is one more, a recipe of that many sources exports with its first source as
    mergekit's base (SLERP of two sources: the recipe's base is then only their origin).
    An operator with ``source_tensor`` context is mergekit's layer-slice copy (passthrough).
    """

    name: str
    fn: Callable[..., Tensor]
    source_genes: tuple[str, ...]
    params: dict[str, Any] = field(default_factory=dict)
    needs_base: bool = True
    sparsify: str | None = None
    mergekit_method: str | None = None
    description: str = ""
    group_params: tuple[str, ...] = ()
    context: frozenset[str] = frozenset()
    min_sources: int = 1
    max_sources: int | None = None
    stats: Callable[[Tensor, Tensor], Tensor] | None = None
    linear: Callable[..., tuple[float, list[float]] | None] | None = None
    param_bounds: dict[str, Bounds] = field(default_factory=dict)
    mergekit_defaults: dict[str, Any] | None = None
    fused: Callable[..., Plan | None] | None = None
    mergekit_inputs: dict[str, tuple[str, Any]] = field(default_factory=dict)
    mergekit_fixed: dict[str, Any] = field(default_factory=dict)
    mergekit_rescale: tuple[Any, Any] | None = None
    mergekit_drop: str = "exact"
    mergekit_models: int | None = None

    def __post_init__(self) -> None:
        bad = set(self.context) - CONTEXTS
        if bad:
            raise ValueError(f"{self.name}: unknown context {sorted(bad)}")
        if self.sparsify not in SPARSIFY:
            raise ValueError(f"{self.name}: unknown sparsify {self.sparsify!r}")
        if set(self.source_genes) - {"weight", "density"}:
            raise ValueError(f"{self.name}: source genes are weight and density, not {self.source_genes}")
        if set(self.param_bounds) - set(self.group_params):
            raise ValueError(f"{self.name}: searchable params must be group params ({list(self.group_params)})")
        if set(self.group_params) - set(self.params):
            raise ValueError(f"{self.name}: group params need a method-wide default")
        if self.mergekit_drop not in MERGEKIT_DROP:
            raise ValueError(f"{self.name}: unknown mergekit_drop {self.mergekit_drop!r}")
        targets = {t for t, _ in self.mergekit_inputs.values()} | set(self.mergekit_fixed)
        if targets - {"weight", "density"} - set(self.params):
            raise ValueError(f"{self.name}: mergekit inputs and fixed values name evomerge genes or params")

    def resolved(self, params: dict[str, Any]) -> tuple[str | None, frozenset[str]]:
        """``(sparsify, context)`` for these params: a wrapper adds its base method's needs."""
        sp, ctx = self.sparsify, set(self.context)
        bm = params.get("base_method") if "base_method" in self.params else None
        if bm is not None:
            inner = get_operator(bm)
            isp, ictx = inner.resolved(resolve_params(inner, params.get("base_params")))
            sp = sp or isp
            ctx |= ictx
        return sp, frozenset(ctx)

    def needs_data(self, params: dict[str, Any] | None = None) -> bool:
        """Whether these params make the operator need statistics computed from data (Fisher)."""
        return "fisher" in self.resolved(resolve_params(self, params))[1]

    def check_sources(self, k: int) -> None:
        if k < self.min_sources or (self.max_sources is not None and k > self.max_sources):
            hi = "" if self.max_sources is None else f" and at most {self.max_sources}"
            raise ValueError(f"method {self.name!r} takes at least {self.min_sources}{hi} source models, got {k}")

    def bounds(self, param: str, k: int) -> tuple[float, float]:
        """The search bounds of group param ``param`` for ``k`` source models."""
        b = self.param_bounds[param]
        return b(k) if callable(b) else b

    def decode_param(self, param: str, u: float, k: int) -> float | int:
        """A unit-cube gene ``u`` in [0, 1] as the value of ``param`` (an integer for integer bounds)."""
        lo, hi = self.bounds(param, k)
        u = min(1.0, max(0.0, float(u)))
        if isinstance(lo, int) and isinstance(hi, int):  # hi - lo + 1 equal bins of the unit interval
            return lo + min(hi - lo, int(u * (hi - lo + 1)))
        return lo + (hi - lo) * u


OPERATORS: dict[str, OperatorSpec] = {}

#: mergekit method names accepted as aliases of evomerge operators.
ALIASES: dict[str, str] = {}


def register(spec: OperatorSpec, *aliases: str) -> OperatorSpec:
    """Add an operator to the registry (each operator module calls this once at import)."""
    if spec.name in OPERATORS:
        raise ValueError(f"operator {spec.name!r} is already registered")
    OPERATORS[spec.name] = spec
    for a in aliases:
        ALIASES[a] = spec.name
    return spec


def get_operator(name: str) -> OperatorSpec:
    key = ALIASES.get(name, name)
    try:
        return OPERATORS[key]
    except KeyError:
        raise KeyError(f"unknown merge method {name!r}; known: {sorted(OPERATORS)}") from None


def resolve_params(spec: OperatorSpec, params: dict[str, Any] | None) -> dict[str, Any]:
    """The operator's defaults overridden by a recipe's params; unknown keys are an error."""
    params = dict(params or {})
    unknown = set(params) - set(spec.params)
    if unknown:
        raise ValueError(f"method {spec.name!r} has no parameter(s) {sorted(unknown)}; it takes {sorted(spec.params)}")
    return {**spec.params, **params}


def _load_all() -> None:
    """Import every operator module (registering its spec) and re-export its public functions."""
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"{__name__}.{info.name}")
        for public in getattr(mod, "__all__", ()):
            globals()[public] = getattr(mod, public)
            __all__.append(public)


_load_all()
