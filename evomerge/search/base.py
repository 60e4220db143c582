"""The ask/tell interface every search algorithm implements, and the registry of algorithms.

Conventions:

* genotypes live in the unit cube ``[0, 1]^dim``; the genome module decodes them into recipes;
* ``tell`` receives objective values in the user's units, one per objective, with ``directions`` saying
  ``"maximize"`` or ``"minimize"`` per objective; internally every algorithm minimises;
* ``None`` (or any NaN/inf value) marks a failed candidate, which is treated as the worst possible;
* results may arrive in any order, in several calls, and more than once (a retried Ray task): a tell
  for a key that is not outstanding is ignored;
* ``state_dict()`` is plain JSON data; ``load_state_dict()`` on a fresh instance built with the same
  constructor arguments continues exactly (same future proposals given the same results), including
  proposals that were handed out but not yet told.
"""

from __future__ import annotations

import math
import random
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import numpy as np

STATE_FORMAT = 1

_DIRECTION_ALIASES = {"maximize": "maximize", "max": "maximize", "minimize": "minimize", "min": "minimize"}


@dataclass
class Proposal:
    """One candidate handed out by ``Algorithm.ask``."""

    key: int  # unique per study and increasing; the store keys candidates by it
    x: list[float]  # genotype in [0, 1]^dim
    parents: list[int] = field(default_factory=list)
    generation: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Proposal:
        return cls(key=int(d["key"]), x=[float(v) for v in d["x"]], parents=[int(p) for p in d["parents"]],
                   generation=int(d["generation"]))


@dataclass(frozen=True)
class GenomeLayout:
    """How a parameter-space genome lays out its genes: per layer group, ``genes_per_source`` genes for
    each of ``n_sources`` source models (weight first, then e.g. a density), then ``group_params`` genes
    of the group's own (the operator's searchable params: SLERP's t, consensus k, ...)."""

    n_sources: int
    genes_per_source: int
    group_params: int = 0


@dataclass(frozen=True)
class SearchContext:
    """What the study loop knows of the problem, as plain data, for ``Algorithm.derive_settings``.

    ``bounded`` says per objective whether its values lie in [0, 1]; ``layout`` is the genome's layout
    (None when the genome has none, e.g. a data-flow genome).
    """

    bounded: tuple[bool, ...]
    layout: GenomeLayout | None = None


def layout_settings(settings: dict[str, Any], context: SearchContext) -> dict[str, Any]:
    """``settings`` with the genome's layout (sources, genes per source, group params) filled in where the
    space leaves them out, for the algorithms that recombine whole sources or groups."""
    out = dict(settings)
    if context.layout is not None:
        out.setdefault("n_sources", context.layout.n_sources)
        out.setdefault("genes_per_source", context.layout.genes_per_source)
        if context.layout.group_params:
            out.setdefault("group_params", context.layout.group_params)
    return out


def normalize_directions(directions: Sequence[str]) -> list[str]:
    out = []
    for d in directions:
        norm = _DIRECTION_ALIASES.get(str(d).strip().lower())
        if norm is None:
            raise ValueError(f"direction {d!r}: expected 'maximize' or 'minimize'")
        out.append(norm)
    if not out:
        raise ValueError("at least one objective direction is needed")
    return out


class Algorithm(ABC):
    """Base class: validates the common arguments and keeps the bookkeeping shared by all algorithms."""

    name: ClassVar[str]
    #: True when the algorithm searches for a Pareto front; False when it scalarises with ``weights``
    multi_objective: ClassVar[bool] = True
    #: True when ``ask`` waits for a whole generation's results before sampling the next (a barrier)
    generational: ClassVar[bool] = False
    #: settings this algorithm accepts, with their defaults (``None`` = computed from dim etc.)
    default_settings: ClassVar[dict[str, Any]] = {}
    #: True when ``tell`` wants per-example scores: results come as ``(key, values, samples)``, the
    #: samples flattened objective by objective (a multi-fidelity stop, with a slice only, is refused)
    needs_samples: ClassVar[bool] = False
    #: True when ``derive_settings`` reads the genome's layout (``SearchContext.layout``)
    needs_layout: ClassVar[bool] = False

    @classmethod
    def derive_settings(cls, settings: dict[str, Any], context: SearchContext) -> dict[str, Any]:
        """The user's settings completed from the problem (what the user left out and the objectives or
        the genome determine); the study loop calls this, so it needs to know no algorithm by name."""
        return dict(settings)

    def __init__(self, dim: int, directions: list[str], seed: int, weights: list[float] | None = None,
                 **settings: Any) -> None:
        if int(dim) < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.dim = int(dim)
        self.directions = normalize_directions(directions)
        self.n_obj = len(self.directions)
        self.seed = int(seed)
        if weights is None:
            self.weights = [1.0] * self.n_obj
        else:
            if len(weights) != self.n_obj:
                raise ValueError(f"{len(weights)} weights for {self.n_obj} objectives")
            self.weights = [float(w) for w in weights]
            if not all(math.isfinite(w) and w >= 0 for w in self.weights):
                raise ValueError(f"weights must be finite and >= 0, got {self.weights}")
        unknown = sorted(set(settings) - set(self.default_settings))
        if unknown:
            known = ", ".join(sorted(self.default_settings)) or "none"
            raise ValueError(f"algorithm {self.name!r}: unknown setting(s) {unknown}; known: {known}")
        self.settings: dict[str, Any] = {**self.default_settings, **settings}
        self._signs = np.array([-1.0 if d == "maximize" else 1.0 for d in self.directions])

    # ----------------------------------------------------------------- interface
    @abstractmethod
    def ask(self, n: int) -> list[Proposal]:
        """Up to ``n`` new proposals; fewer (even none) while waiting on outstanding results."""

    @abstractmethod
    def tell(self, results: list[tuple[int, list[float] | None]]) -> None:
        """Report results ``(key, values or None)``; unknown or already-told keys are ignored."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable state."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state produced by ``state_dict`` of an instance with the same constructor args."""

    def done(self) -> bool:
        return False

    def take_niches(self) -> dict[int, Any]:
        """Niches (plain JSON) of the candidates told since the last call, by key, for the store's
        ``niche`` column; the study loop takes them after every tell. Algorithms without niches: {}."""
        return {}

    @property
    @abstractmethod
    def outstanding(self) -> list[int]:
        """Keys handed out and not yet told (a resumed run re-tells exactly these from the store)."""

    # ----------------------------------------------------------------- helpers
    def config(self) -> dict[str, Any]:
        """The constructor arguments; ``make_algorithm(name, **config())`` rebuilds an equivalent instance."""
        return {"dim": self.dim, "directions": list(self.directions), "seed": self.seed,
                "weights": list(self.weights), **self.settings}

    def _header(self) -> dict[str, Any]:
        return {"algorithm": self.name, "format": STATE_FORMAT, "config": self.config()}

    def _check_header(self, state: dict[str, Any]) -> None:
        if state.get("algorithm") != self.name:
            raise ValueError(f"state is for algorithm {state.get('algorithm')!r}, not {self.name!r}")
        if state.get("format") != STATE_FORMAT:
            raise ValueError(
                f"state format {state.get('format')!r} is not supported (expected {STATE_FORMAT})"
            )
        mine, theirs = self.config(), state.get("config", {})
        if _jsonish(mine) != _jsonish(theirs):
            raise ValueError(f"state was saved by an instance built with {theirs}, this one has {mine}")

    def to_min(self, values: Sequence[float] | None) -> np.ndarray | None:
        """Objective values in minimisation form, or ``None`` for a failure (None, NaN, inf)."""
        if values is None:
            return None
        arr = np.asarray(values, dtype=float).reshape(-1)
        if arr.shape[0] != self.n_obj:
            raise ValueError(f"expected {self.n_obj} objective values, got {len(arr)}")
        if not np.all(np.isfinite(arr)):
            return None
        return arr * self._signs


def _jsonish(obj: Any) -> Any:
    """Normalise tuples/ints so that a config compares equal to its JSON round trip."""
    if isinstance(obj, dict):
        return {str(k): _jsonish(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonish(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, (int, float, np.integer, np.floating)):
        return float(obj)
    return obj


@contextmanager
def private_global_rng(holder: Any, attr: str = "_global_rng") -> Iterator[None]:
    """Run library code against a private copy of numpy's and Python's global RNGs.

    ``cma`` samples from ``np.random`` (and seeds it); whatever else the study loop does with the global
    RNGs between two asks must not change the proposals, and the library must not disturb the caller's
    RNG. ``holder.<attr>`` keeps the private (numpy, python) states between calls.
    """
    outer_np, outer_py = np.random.get_state(), random.getstate()
    inner = getattr(holder, attr, None)
    if inner is None:
        np.random.seed(holder.seed % (2**32))
        random.seed(holder.seed)
    else:
        np.random.set_state(inner[0])
        random.setstate(inner[1])
    try:
        yield
    finally:
        setattr(holder, attr, (np.random.get_state(), random.getstate()))
        np.random.set_state(outer_np)
        random.setstate(outer_py)


REGISTRY: dict[str, type[Algorithm]] = {}


def register(cls: type[Algorithm]) -> type[Algorithm]:
    REGISTRY[cls.name] = cls
    return cls


def make_algorithm(name: str, **kw: Any) -> Algorithm:
    """Build a registered algorithm: ``make_algorithm("cmaes", dim=4, directions=["maximize"], seed=0)``."""
    try:
        cls = REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r}; known: {', '.join(sorted(REGISTRY))}") from None
    return cls(**kw)


def restore_algorithm(state: dict[str, Any]) -> Algorithm:
    """Rebuild an algorithm from its ``state_dict()`` alone (the state carries its constructor args)."""
    algo = make_algorithm(state["algorithm"], **state["config"])
    algo.load_state_dict(state)
    return algo
