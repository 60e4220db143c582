"""Optuna samplers (TPE, NSGA-II, GP) through evomerge's ask/tell interface.

Registered as ``optuna_tpe``, ``optuna_nsga2`` and ``optuna_gp``. Each gene is a
``FloatDistribution(0, 1)`` parameter named ``x0 .. x{dim-1}``; the study's ``directions`` are the
evomerge directions (values are told in the user's units); a failed candidate (None, NaN, inf) is
told as ``TrialState.FAIL``, which every Optuna sampler ignores when modelling. The trial number of a
proposal is its key. None of these algorithms has a generation barrier: ``ask(n)`` always returns
``n`` proposals (outstanding trials are RUNNING trials of the study).

The evomerge store stays the source of truth. The Optuna study lives in memory only;
``state_dict()`` is a plain-data dump of it -- every trial (number, params, state, values, the
sampler's system attributes, e.g. NSGA-II's generation numbers) and the study's system attributes
(NSGA-II's cached parent populations) -- and ``load_state_dict`` **rebuilds a fresh in-memory study**
from that dump with ``optuna.trial.create_trial`` + ``study.add_trial`` (outstanding proposals are
added as RUNNING trials, so they can still be told). Trial ids, numbers and attributes come out the
same as in the uninterrupted study.

Exactness. An Optuna sampler is seeded once, then its RNG advances with every sample, and some
samplers keep hidden caches (GPSampler warm-starts kernel fits from the previous fit). Neither
survives a rebuild, so this module never relies on them: **before each ask it builds a fresh sampler
seeded from (seed, trial number)** (``numpy.random.SeedSequence([seed, key])``). A proposal is then a
pure function of the seed, the key and the study's trials, and a resumed run proposes exactly what an
uninterrupted one proposes (checked by ``tests/test_algorithms.py::test_resume_is_exact``). The cost
is that Optuna's cross-ask caches are not reused (a GP is refitted from its default initial kernel
parameters every ask), which changes the search negligibly.

Settings (all plain data):

* common: ``max_evals`` (None: unbounded; ``done()`` after that many asks) and ``sampler_options``
  (a dict passed as keyword arguments to the sampler's constructor, for any other plain-data option);
* ``optuna_tpe``: ``n_startup_trials`` (10), ``n_ei_candidates`` (24), ``multivariate`` (False),
  ``constant_liar`` (False; True makes TPE avoid the points of RUNNING trials, useful with many
  workers);
* ``optuna_nsga2``: ``population_size`` (16, Optuna's default is 50: evomerge budgets are small and
  16 matches evomerge's pymoo ``nsga2``), ``mutation_prob`` (None: 1/dim), ``crossover_prob`` (0.9),
  ``swapping_prob`` (0.5);
* ``optuna_gp``: ``n_startup_trials`` (10), ``deterministic_objective`` (False). Needs ``torch``
  (and scipy), checked when the algorithm is built, with a clear error if missing. Optuna also uses
  the optional ``greenlet`` package to run its L-BFGS-B restarts in batch; without it (as here) it
  falls back to sequential optimisation and logs a warning: an ask then costs ~0.5 s (1 objective,
  2 genes) to ~5 s (2 objectives, 6 genes, ~50 trials) on a busy 2-core machine. The class is
  flagged ``slow = True`` for test suites.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np

from evomerge.search.base import Algorithm, Proposal, register

_STATES = ("running", "complete", "fail")


@contextlib.contextmanager
def _quiet_optuna() -> Iterator[None]:
    """Silence Optuna's INFO logging ("Trial N finished ...") and experimental warnings, then restore."""
    import optuna  # optuna only for optuna_* studies: the algorithm registry stays light

    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        optuna.logging.set_verbosity(level)


def ask_seed(seed: int, key: int) -> int:
    """The sampler seed used for the ask that creates trial ``key`` (deterministic in (seed, key))."""
    return int(np.random.SeedSequence([int(seed) % (2**63), int(key)]).generate_state(1)[0])


class OptunaAlgorithm(Algorithm):
    """Common machinery: an in-memory Optuna study rebuilt from plain data, a fresh seeded sampler per ask."""

    sampler_settings: ClassVar[tuple[str, ...]] = ()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        opts = self.settings.get("sampler_options") or {}
        if not isinstance(opts, dict):
            raise ValueError(f"{self.name}: sampler_options must be a dict, got {type(opts).__name__}")
        self._make_sampler(0)  # validate the settings (and the optional dependencies) early
        self._names = [f"x{i}" for i in range(self.dim)]
        self._study = self._new_study()

    # ------------------------------------------------------------------ sampler / study
    def _sampler_kwargs(self) -> dict[str, Any]:
        kw = {k: self.settings[k] for k in self.sampler_settings}
        kw.update(self.settings.get("sampler_options") or {})
        return kw

    def _make_sampler(self, seed: int) -> Any:
        raise NotImplementedError

    def _new_study(self) -> Any:
        import optuna  # optuna only for optuna_* studies

        with _quiet_optuna():
            return optuna.create_study(storage=optuna.storages.InMemoryStorage(),
                                       sampler=optuna.samplers.RandomSampler(seed=0),
                                       directions=list(self.directions))

    def _distributions(self) -> dict[str, Any]:
        from optuna.distributions import FloatDistribution  # optuna only for optuna_* studies

        return {n: FloatDistribution(0.0, 1.0) for n in self._names}

    @property
    def study(self) -> Any:
        """The in-memory Optuna study (read it, do not tell through it)."""
        return self._study

    def _generation_of(self, trial: Any) -> int:
        return 0

    # ------------------------------------------------------------------ interface
    def ask(self, n: int) -> list[Proposal]:
        n = int(n)
        me = self.settings.get("max_evals")
        if me is not None:
            n = max(0, min(n, int(me) - len(self._study._get_trials(deepcopy=False))))
        dists = self._distributions()
        out = []
        with _quiet_optuna():
            for _ in range(n):
                key = len(self._study._get_trials(deepcopy=False))
                self._study.sampler = self._make_sampler(ask_seed(self.seed, key))
                trial = self._study.ask(fixed_distributions=dists)
                assert trial.number == key
                x = [min(1.0, max(0.0, float(trial.params[nm]))) for nm in self._names]
                frozen = self._study._storage.get_trial(trial._trial_id)
                out.append(Proposal(key=key, x=x, parents=[], generation=self._generation_of(frozen)))
        return out

    def tell(self, results: list[tuple[int, list[float] | None]]) -> None:
        from optuna.trial import TrialState  # optuna only for optuna_* studies

        trials = self._study._get_trials(deepcopy=False)
        with _quiet_optuna():
            for key, values in results:
                key = int(key)
                if not (0 <= key < len(trials)) or trials[key].state != TrialState.RUNNING:
                    continue  # unknown, not handed out, or already told: ignore
                fmin = self.to_min(values)  # validates the number of values
                if fmin is None:
                    self._study.tell(key, state=TrialState.FAIL)
                else:
                    self._study.tell(key, [float(v) for v in values])  # type: ignore[union-attr]
                trials = self._study._get_trials(deepcopy=False)

    @property
    def outstanding(self) -> list[int]:
        from optuna.trial import TrialState  # optuna only for optuna_* studies

        return [t.number for t in self._study._get_trials(deepcopy=False) if t.state == TrialState.RUNNING]

    def done(self) -> bool:
        me = self.settings.get("max_evals")
        return me is not None and len(self._study._get_trials(deepcopy=False)) >= int(me)

    def told(self) -> list[tuple[int, list[float], list[float] | None]]:
        """(key, x, values or None for a failure) of every told trial, in key order."""
        from optuna.trial import TrialState  # optuna only for optuna_* studies

        out = []
        for t in self._study._get_trials(deepcopy=False):
            if t.state == TrialState.RUNNING:
                continue
            vals = None if t.state != TrialState.COMPLETE else [float(v) for v in t.values]
            out.append((t.number, [float(t.params[nm]) for nm in self._names], vals))
        return out

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        import optuna  # optuna only for optuna_* studies
        from optuna.trial import TrialState

        names = {TrialState.RUNNING: "running", TrialState.COMPLETE: "complete", TrialState.FAIL: "fail"}
        trials = []
        for t in self._study._get_trials(deepcopy=False):
            trials.append({
                "key": t.number,
                "x": [float(t.params[nm]) for nm in self._names],
                "state": names[t.state],
                "values": None if t.values is None else [float(v) for v in t.values],
                "system_attrs": _plain(dict(sorted(t.system_attrs.items()))),
            })
        study_attrs = self._study._storage.get_study_system_attrs(self._study._study_id)
        return {
            **self._header(),
            "versions": {"optuna": optuna.__version__},
            "trials": trials,
            "study_system_attrs": _plain(dict(sorted(study_attrs.items()))),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        import optuna  # optuna only for optuna_* studies
        from optuna.trial import TrialState

        self._check_header(state)
        states = {"running": TrialState.RUNNING, "complete": TrialState.COMPLETE, "fail": TrialState.FAIL}
        study = self._new_study()
        dists = self._distributions()
        with _quiet_optuna():
            for i, t in enumerate(state["trials"]):
                if int(t["key"]) != i:
                    raise ValueError(f"{self.name}: stored trials are not numbered 0..n-1 (got {t['key']} at {i})")
                if t["state"] not in states:
                    raise ValueError(f"{self.name}: unknown trial state {t['state']!r}")
                frozen = optuna.trial.create_trial(
                    state=states[t["state"]],
                    params={nm: float(v) for nm, v in zip(self._names, t["x"], strict=True)},
                    distributions=dists,
                    values=None if t["values"] is None else [float(v) for v in t["values"]],
                    system_attrs=dict(t.get("system_attrs") or {}),
                )
                study.add_trial(frozen)
            for k, v in (state.get("study_system_attrs") or {}).items():
                study._storage.set_study_system_attr(study._study_id, k, v)
        self._study = study


def _plain(obj: Any) -> Any:
    """JSON-safe copy of Optuna attributes (tuples become lists; NaN/inf are refused)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (bool, str)) or obj is None:
        return obj
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        if not np.isfinite(f):
            raise ValueError(f"non-finite value {f} in an Optuna attribute")
        return f
    raise TypeError(f"Optuna attribute of type {type(obj).__name__} is not plain data")


@register
class OptunaTPE(OptunaAlgorithm):
    name = "optuna_tpe"
    default_settings = {
        "n_startup_trials": 10,
        "n_ei_candidates": 24,
        "multivariate": False,
        "constant_liar": False,
        "max_evals": None,
        "sampler_options": None,
    }
    sampler_settings = ("n_startup_trials", "n_ei_candidates", "multivariate", "constant_liar")

    def _make_sampler(self, seed: int) -> Any:
        import optuna  # optuna only for optuna_* studies

        kw = self._sampler_kwargs()
        kw["n_startup_trials"] = int(kw["n_startup_trials"])
        kw["n_ei_candidates"] = int(kw["n_ei_candidates"])
        with _quiet_optuna():
            return optuna.samplers.TPESampler(seed=seed, **kw)


@register
class OptunaNSGA2(OptunaAlgorithm):
    name = "optuna_nsga2"
    default_settings = {
        "population_size": 16,
        "mutation_prob": None,
        "crossover_prob": 0.9,
        "swapping_prob": 0.5,
        "max_evals": None,
        "sampler_options": None,
    }
    sampler_settings = ("population_size", "mutation_prob", "crossover_prob", "swapping_prob")

    def _make_sampler(self, seed: int) -> Any:
        import optuna  # optuna only for optuna_* studies

        kw = self._sampler_kwargs()
        kw["population_size"] = int(kw["population_size"])
        with _quiet_optuna():
            return optuna.samplers.NSGAIISampler(seed=seed, **kw)

    def _generation_of(self, trial: Any) -> int:
        from optuna.samplers import NSGAIISampler  # optuna only for optuna_* studies

        return int(trial.system_attrs.get(NSGAIISampler._get_generation_key(), 0))


@register
class OptunaGP(OptunaAlgorithm):
    name = "optuna_gp"
    #: a GP ask costs ~0.5-5 s on 2 busy CPU cores (kernel fit + multi-start L-BFGS-B acquisition
    #: optimisation, sequential without the optional ``greenlet`` package); suites may skip it
    slow: ClassVar[bool] = True
    default_settings = {
        "n_startup_trials": 10,
        "deterministic_objective": False,
        "max_evals": None,
        "sampler_options": None,
    }
    sampler_settings = ("n_startup_trials", "deterministic_objective")

    def _make_sampler(self, seed: int) -> Any:
        import optuna  # optuna only for optuna_* studies

        try:
            import scipy  # noqa: F401
            import torch  # noqa: F401
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(f"optuna_gp needs torch and scipy ({e}); install them or use optuna_tpe") from e
        kw = self._sampler_kwargs()
        kw["n_startup_trials"] = int(kw["n_startup_trials"])
        kw["deterministic_objective"] = bool(kw["deterministic_objective"])
        with _quiet_optuna():
            return optuna.samplers.GPSampler(seed=seed, **kw)
