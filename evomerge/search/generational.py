"""Shared machinery for generational, library-backed algorithms (CMA-ES, NSGA-II).

The library object (``cma.CMAEvolutionStrategy``, pymoo's ``NSGA2``) samples a whole generation at
once and can only sample the next one after the whole generation is told (the *generation barrier*).
This class hands a generation out piece by piece, collects results in any order, and tells the library
once every member is back.

State as plain data, by replay: the library's internals (covariance, evolution paths, populations,
RNG streams) are not stored; the state holds the results of every completed generation and the
current generation's proposals and partial results. ``load_state_dict`` builds a fresh library object
from the seed and the settings and replays the same sequence of library calls (ask, tell, ask, ...).
Both libraries are deterministic under a seed and run under a private copy of the global RNGs
(:func:`private_global_rng`), so the replay reproduces the library object bit for bit; a digest of the
last sampled generation is checked so that a library upgrade that changed the sampling is reported
instead of silently continuing differently. Replaying costs what the library itself cost in the
original run (milliseconds per generation), negligible next to evaluating one merged model.
"""

from __future__ import annotations

import hashlib
import json
from abc import abstractmethod
from typing import Any

from evomerge.search.base import Algorithm, Proposal, private_global_rng


def _digest(raw: list[list[float]]) -> str:
    return hashlib.sha256(json.dumps(raw).encode()).hexdigest()[:16]


class GenerationalAlgorithm(Algorithm):
    """Generation barrier, asynchronous result collection and replay-based state."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reset()

    # ---------------------------------------------------------------- library hooks
    @abstractmethod
    def _lib_new(self) -> None:
        """Build a fresh library object (called inside the private RNG context)."""

    @abstractmethod
    def _lib_ask(self) -> tuple[list[list[float]], list[list[int]]]:
        """Sample one generation: (raw library vectors, parents per member). Inside the RNG context."""

    @abstractmethod
    def _lib_tell(self, results: list[list[float] | None]) -> None:
        """Tell the whole generation; one entry per member in sampling order, ``None`` = failed."""

    @staticmethod
    def _lib_versions() -> dict[str, str]:
        return {}

    #: asynchronous mode: every ask is a sample of the current distribution (``_lib_ahead``), and the
    #: first ``_lib_popsize()`` results back, whichever samples they are, form the next generation
    #: (``_lib_inject``): no barrier, and stragglers join a later generation
    asks_ahead: bool = False

    def _lib_popsize(self) -> int:
        raise NotImplementedError

    def _lib_ahead(self, keys: list[int]) -> list[list[float]]:
        """Raw samples of the current distribution, one per key, drawn from generators seeded by the
        key (not the library's RNG, so the library's own sampling is replayed as it was)."""
        raise NotImplementedError

    def _lib_inject(self, raw: list[list[float]]) -> None:
        """Make the next ``_lib_ask`` return ``raw`` as its members. Inside the RNG context."""
        raise NotImplementedError

    def _decode(self, raw: list[float]) -> list[float]:
        """Genotype handed out for a library vector (CMA clips into the unit cube)."""
        return [float(v) for v in raw]

    # ---------------------------------------------------------------- bookkeeping
    def _reset(self) -> None:
        self._global_rng = None
        self._next_key = 0
        self._generation = 0  # index of the generation being handed out / collected
        self._log: list[list[list[float] | None]] = []  # completed generations, min-space results
        self._last_digest: str | None = None
        self._cur: dict[str, Any] | None = None
        self._ahead: list[dict[str, Any]] = []  # asynchronous mode: {"key", "raw", "x"} (+ "result", "order")
        self._injected: dict[int, list[list[float]]] = {}  # generation -> its members' raw vectors
        self._arrivals = 0
        with private_global_rng(self):
            self._lib_new()

    def _sample_generation(self) -> None:
        with private_global_rng(self):
            raw, parents = self._lib_ask()
        raw = [[float(v) for v in row] for row in raw]
        pairs = enumerate(zip(raw, parents, strict=True))
        gen = self._generation
        props = [Proposal(key=self._next_key + i, x=self._decode(r), parents=list(p), generation=gen)
                 for i, (r, p) in pairs]
        self._next_key += len(props)
        self._cur = {"raw": raw, "proposals": props, "handed": 0, "results": {}}
        self._last_digest = _digest(raw)

    def _complete_generation(self) -> None:
        cur = self._cur
        assert cur is not None
        ordered = [cur["results"][p.key] for p in cur["proposals"]]
        with private_global_rng(self):
            self._lib_tell(ordered)
        self._log.append(ordered)
        self._cur = None
        self._generation += 1

    # ---------------------------------------------------------------- asynchronous mode
    def _ask_ahead(self, n: int) -> list[Proposal]:
        if self.done() or n <= 0:
            return []
        keys = list(range(self._next_key, self._next_key + n))
        self._next_key += n
        out = []
        for key, raw in zip(keys, self._lib_ahead(keys), strict=True):
            raw = [float(v) for v in raw]
            p = Proposal(key=key, x=self._decode(raw), parents=[], generation=self._generation)
            self._ahead.append({"key": key, "raw": raw, "x": p.x})
            out.append(p)
        return out

    def _tell_ahead(self, results: list[tuple[int, list[float] | None]]) -> None:
        by_key = {a["key"]: a for a in self._ahead}
        for key, values in results:
            a = by_key.get(int(key))
            if a is None or "result" in a:
                continue
            fmin = self.to_min(values)
            a["result"] = None if fmin is None else [float(v) for v in fmin]
            a["order"] = self._arrivals
            self._arrivals += 1
        size = self._lib_popsize()
        while not self.done():
            back = sorted((a for a in self._ahead if "result" in a), key=lambda a: a["order"])
            if len(back) < size:
                break
            take = back[:size]
            gen = self._generation
            self._injected[gen] = [a["raw"] for a in take]
            with private_global_rng(self):
                self._lib_inject(self._injected[gen])
                raw, _ = self._lib_ask()
                self._lib_tell([a["result"] for a in take])
            self._log.append([a["result"] for a in take])
            self._last_digest = _digest([[float(v) for v in row] for row in raw])
            self._generation += 1
            used = {a["key"] for a in take}
            self._ahead = [a for a in self._ahead if a["key"] not in used]

    # ---------------------------------------------------------------- interface
    def ask(self, n: int) -> list[Proposal]:
        if self.asks_ahead:
            return self._ask_ahead(int(n))
        out: list[Proposal] = []
        n = int(n)
        while len(out) < n:
            if self._cur is None:
                if self.done():
                    break
                self._sample_generation()
            cur = self._cur
            assert cur is not None
            props = cur["proposals"]
            if cur["handed"] >= len(props):
                break  # whole generation handed out: wait for its results
            take = props[cur["handed"]: cur["handed"] + (n - len(out))]
            cur["handed"] += len(take)
            out.extend(Proposal(p.key, list(p.x), list(p.parents), p.generation) for p in take)
            if not props:  # a library returned an empty generation; nothing to wait for
                self._complete_generation()
        return out

    def tell(self, results: list[tuple[int, list[float] | None]]) -> None:
        if self.asks_ahead:
            self._tell_ahead(results)
            return
        for key, values in results:
            cur = self._cur
            if cur is None:
                continue
            props = cur["proposals"]
            key = int(key)
            first = props[0].key if props else 0
            idx = key - first
            if not (0 <= idx < cur["handed"]) or key in cur["results"]:
                continue  # unknown, not handed out yet, or already told: ignore
            fmin = self.to_min(values)
            cur["results"][key] = None if fmin is None else [float(v) for v in fmin]
            if len(cur["results"]) == len(props):
                self._complete_generation()

    @property
    def outstanding(self) -> list[int]:
        if self.asks_ahead:
            return [a["key"] for a in self._ahead if "result" not in a]
        if self._cur is None:
            return []
        props = self._cur["proposals"][: self._cur["handed"]]
        return [p.key for p in props if p.key not in self._cur["results"]]

    @property
    def generation(self) -> int:
        return self._generation

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        cur = None
        if self._cur is not None:
            cur = {
                "proposals": [p.to_dict() for p in self._cur["proposals"]],
                "raw": self._cur["raw"],
                "handed": self._cur["handed"],
                "results": [[k, v] for k, v in sorted(self._cur["results"].items())],
            }
        return {
            **self._header(),
            "versions": self._lib_versions(),
            "next_key": self._next_key,
            "generation": self._generation,
            "log": self._log,
            "current": cur,
            "last_digest": self._last_digest,
            **({"ahead": self._ahead, "arrivals": self._arrivals,
                "injected": [[g, r] for g, r in sorted(self._injected.items())]} if self.asks_ahead else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_header(state)
        self._reset()
        log = state["log"]
        cur = state.get("current")
        self._injected = {int(g): [[float(v) for v in row] for row in r] for g, r in state.get("injected", [])}
        # replay completed generations
        raw: list[list[float]] = []
        for i, gen in enumerate(log):
            with private_global_rng(self):
                if i in self._injected:
                    self._lib_inject(self._injected[i])
                raw, _ = self._lib_ask()
                self._lib_tell([None if r is None else [float(v) for v in r] for r in gen])
            if len(raw) != len(gen):
                self._diverged(state)
        self._log = [list(g) for g in log]
        self._generation = int(state["generation"])
        if cur is not None:
            with private_global_rng(self):
                raw, _ = self._lib_ask()
            raw = [[float(v) for v in row] for row in raw]
            if raw != [[float(v) for v in row] for row in cur["raw"]]:
                self._diverged(state)
            self._cur = {
                "raw": raw,
                "proposals": [Proposal.from_dict(p) for p in cur["proposals"]],
                "handed": int(cur["handed"]),
                "results": {
                    int(k): (None if v is None else [float(x) for x in v]) for k, v in cur["results"]
                },
            }
            self._last_digest = _digest(raw)
        elif log:
            self._last_digest = _digest([[float(v) for v in row] for row in raw])
            if state.get("last_digest") not in (None, self._last_digest):
                self._diverged(state)
        self._next_key = int(state["next_key"])
        self._arrivals = int(state.get("arrivals", 0))
        self._ahead = []
        for a in state.get("ahead", []):
            item: dict[str, Any] = {"key": int(a["key"]), "raw": [float(v) for v in a["raw"]],
                                    "x": [float(v) for v in a["x"]]}
            if "result" in a:
                item["result"] = None if a["result"] is None else [float(v) for v in a["result"]]
                item["order"] = int(a["order"])
            self._ahead.append(item)

    def _diverged(self, state: dict[str, Any]) -> None:
        raise RuntimeError(
            f"{self.name}: replaying the saved state did not reproduce the saved proposals "
            f"(saved with {state.get('versions')}, running {self._lib_versions()}); the library's "
            "sampling changed, so this study cannot be resumed exactly with these versions"
        )
