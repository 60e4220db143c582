"""Nested MAP as a search algorithm: pairwise 2-D MAP studies over groups of source models.

Li et al. 2024 (the MAP paper) merge many models by *nested MAP*: merge two groups with a 2-D MAP over
their two coefficients, put the chosen merge back into the pool, repeat. :func:`nested_map_pairs` plans
that with a synchronous evaluation function; this class runs the same procedure through ask/tell, so a
space selects it (``algorithm: {name: map_nested}``) and the study loop evaluates its candidates on its
workers like any other algorithm's.

Genotype. The genome's layout (``n_sources`` source models, ``genes_per_source`` genes each per layer
group, ``group_params`` genes of each group's own; the study loop fills these in from the genome)
decides which genes are a source's weight: the first of its genes in every layer group. Every group
starts as one source with the one-hot coefficient vector. A pair step's 2-D point ``(a, b)`` gives
each source's weight gene ``a * left[k] + b * right[k]`` (the sources of neither group get 0, so they are
left out), the same in every layer group; density genes are 1 (keep everything) and a group's own
params sit mid-range. With weight bounds starting at 0 a gene is proportional to the source's
task-arithmetic coefficient, so the chosen pair's genes are again a coefficient vector over the sources,
as in the paper.

Objectives. ``objective_groups`` says which objectives measure which source's skill (one list of
objective indices per source); by default objective ``i`` belongs to source ``i`` when there are as many
objectives as sources; with more objectives, objective ``i`` to source ``i mod n_sources``; with fewer,
source ``k`` is measured by objective ``k mod n_objectives`` (set ``objective_groups`` when that is not
what the objectives mean). A step's two objectives are the means
over each side's objectives, each in maximisation form (a minimised objective counts negated), with a
sigmoid link when every objective of the side is bounded in [0, 1] and maximised. The chosen merge of
a step is the really evaluated point of best task-count-weighted mean (the paper's choice rule).

Steps. The two smallest groups are merged first (ties: lowest index), a balanced tree. Every step but
the last runs its 2-D MAP with ``step_front_rounds`` front rounds (default 1); the last step, whose
front is the study's, keeps refining its front while the study has budget (``final_front_rounds``,
default unbounded). ``map_settings`` go to every step's MAP (``n_front`` defaults to 8).

State (plain JSON, exact resume): the pool, the step counter, the evaluated points of the current step,
and the current step's MAP state; keys are global, each step's MAP numbering its own from 0.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from evomerge.search.base import Algorithm, Proposal, SearchContext, layout_settings, register
from evomerge.search.map import MAP


@register
class NestedMAP(Algorithm):
    name = "map_nested"
    generational = True
    needs_layout: ClassVar[bool] = True
    #: the MAP of each pair step (map_nested_async: the asynchronous one)
    map_class: ClassVar[type[MAP]] = MAP
    default_settings = {
        "n_sources": None,  # None: every gene is a source's weight (dim sources, one group)
        "genes_per_source": 1,
        "group_params": 0,
        "objective_groups": None,  # per source, the indices of the objectives that measure its skill
        "bounded": None,  # per objective, values in [0, 1] (sigmoid links); the study loop fills it in
        "step_front_rounds": 1,
        "final_front_rounds": None,
        "map_settings": None,  # settings of every step's 2-D MAP
    }

    @classmethod
    def derive_settings(cls, settings: dict[str, Any], context: SearchContext) -> dict[str, Any]:
        out = layout_settings(settings, context)
        out.setdefault("bounded", list(context.bounded))
        return out

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        s = self.settings
        self.n_src = self.dim if s["n_sources"] is None else int(s["n_sources"])
        self.gps = int(s["genes_per_source"])
        self.extra = int(s["group_params"])
        width = self.n_src * self.gps + self.extra
        if self.n_src < 2 or self.gps < 1 or self.extra < 0 or self.dim % width:
            raise ValueError(f"map_nested: needs >= 2 sources and dim {self.dim} a multiple of n_sources "
                             f"{self.n_src} x genes_per_source {self.gps} + group_params {self.extra}")
        self.n_groups = self.dim // width
        groups = s["objective_groups"]
        if groups is None:
            if self.n_obj >= self.n_src:
                groups = [[i for i in range(self.n_obj) if i % self.n_src == k] for k in range(self.n_src)]
            else:
                groups = [[k % self.n_obj] for k in range(self.n_src)]
        if len(groups) != self.n_src or any(not g or any(not 0 <= int(i) < self.n_obj for i in g)
                                            for g in groups):
            raise ValueError(f"map_nested: objective_groups needs one non-empty list of objective indices "
                             f"(0..{self.n_obj - 1}) per source ({self.n_src}), got {groups}")
        self.objective_groups = [[int(i) for i in g] for g in groups]
        bounded = s["bounded"]
        self.bounded = [False] * self.n_obj if bounded is None else [bool(b) for b in bounded]
        if len(self.bounded) != self.n_obj:
            raise ValueError(f"map_nested: bounded needs {self.n_obj} entries, got {bounded}")
        # Two genes: a small NSGA population finds the surrogates' front as well as MAP's default one.
        # n_design 12 (2 x terms, the paper's): every step but the last only picks a merge to go on with,
        # so its design stays as small as the quadratic allows.
        self.map_settings = {"n_front": 8, "nsga_pop_size": 16, "nsga_generations": 20, "n_design": 12,
                             **(s["map_settings"] or {})}
        for reserved in ("front_rounds", "links", "max_evals"):
            if reserved in self.map_settings:
                raise ValueError(f"map_nested: map_settings may not set {reserved!r} (nested MAP sets it)")
        self._reset()

    # ------------------------------------------------------------------ steps
    def _reset(self) -> None:
        self._pool: list[dict[str, Any]] = [{"members": [i], "coefficients": [float(v) for v in np.eye(self.n_src)[i]]}
                                            for i in range(self.n_src)]
        self._step = 0
        self._key_base = 0  # global key of the current step's MAP key 0
        self._gen_base = 0  # global generation of the current step's MAP generation 0
        self._evaluated: list[dict[str, Any]] = []  # the current step's told points: {"x", "values"}
        self._outer: dict[int, dict[str, Any]] = {}  # handed-out keys: {"x" (the step's 2-D point)}
        self._map = self._new_map()

    def _pair(self) -> tuple[int, int]:
        order = sorted(range(len(self._pool)), key=lambda i: (len(self._pool[i]["members"]), i))
        i, j = sorted(order[:2])
        return i, j

    def _side_objectives(self) -> list[list[int]]:
        i, j = self._pair()
        sides = []
        for g in (i, j):
            objs: list[int] = []
            for m in self._pool[g]["members"]:
                objs += [o for o in self.objective_groups[m] if o not in objs]
            sides.append(sorted(objs))
        return sides

    def _new_map(self) -> MAP:
        last = len(self._pool) == 2
        links = []
        for objs in self._side_objectives():
            ok = all(self.bounded[o] and self.directions[o] == "maximize" for o in objs)
            links.append("sigmoid" if ok else "identity")
        rounds = self.settings["final_front_rounds"] if last else self.settings["step_front_rounds"]
        return self.map_class(dim=2, directions=["maximize", "maximize"], seed=self.seed * 1000 + self._step,
                              links=links, front_rounds=rounds, **self.map_settings)

    def _genotype(self, x2: list[float]) -> list[float]:
        i, j = self._pair()
        left = np.asarray(self._pool[i]["coefficients"])
        right = np.asarray(self._pool[j]["coefficients"])
        w = np.clip(float(x2[0]) * left + float(x2[1]) * right, 0.0, 1.0)
        width = self.n_src * self.gps + self.extra
        g = np.zeros(self.dim)
        for grp in range(self.n_groups):
            base = grp * width
            for k in range(self.n_src):
                g[base + k * self.gps] = w[k]
                g[base + k * self.gps + 1: base + (k + 1) * self.gps] = 1.0
            g[base + self.n_src * self.gps: base + width] = 0.5
        return [float(v) for v in g]

    def _side_values(self, values: list[float] | None) -> list[float] | None:
        if self.to_min(values) is None:
            return None
        assert values is not None
        signed = [float(v) if d == "maximize" else -float(v) for v, d in zip(values, self.directions, strict=True)]
        return [float(np.mean([signed[o] for o in objs])) for objs in self._side_objectives()]

    def _advance(self) -> None:
        """Close the current step (its MAP is done): choose its merge and start the next pair."""
        if len(self._pool) == 1:
            return
        i, j = self._pair()
        left, right = self._pool[i], self._pool[j]
        ok = [e for e in self._evaluated if e["values"] is not None]
        if ok:
            gw = np.array([len(left["members"]), len(right["members"])], dtype=float)
            best = max(ok, key=lambda e: float(np.dot(gw, e["values"]) / gw.sum()))
            a, b = best["x"]
        else:  # every evaluation of the step failed: keep both at full weight
            a, b = 1.0, 1.0
        coefs = np.clip(a * np.asarray(left["coefficients"]) + b * np.asarray(right["coefficients"]), 0.0, 1.0)
        merged = {"members": sorted(left["members"] + right["members"]),
                  "coefficients": [float(v) for v in coefs], "chosen": [float(a), float(b)]}
        self._pool = [g for k, g in enumerate(self._pool) if k not in (i, j)]
        self._pool.insert(i, merged)
        self._step += 1
        self._key_base += self._map._next_key
        self._gen_base += self._map.generation
        self._evaluated = []
        self._map = self._new_map()

    def _step_over(self) -> bool:
        return len(self._pool) > 1 and self._map.done() and not self._map.outstanding

    # ------------------------------------------------------------------ interface
    def ask(self, n: int) -> list[Proposal]:
        out: list[Proposal] = []
        while len(out) < int(n):
            if self._step_over() and len(self._pool) > 2:
                self._advance()
                continue
            props = self._map.ask(int(n) - len(out))
            if not props:
                break
            for p in props:
                key = self._key_base + p.key
                self._outer[key] = {"x": list(p.x)}
                out.append(Proposal(key=key, x=self._genotype(p.x), parents=[],
                                    generation=self._gen_base + p.generation))
        return out

    def tell(self, results: list[tuple[int, list[float] | None]]) -> None:
        for key, values in results:
            key = int(key)
            if key not in self._outer:
                continue
            side = self._side_values(values)  # validates the number of values
            x2 = self._outer.pop(key)["x"]
            self._evaluated.append({"x": x2, "values": side})
            self._map.tell([(key - self._key_base, side)])

    def done(self) -> bool:
        return len(self._pool) <= 2 and self._map.done() and not self._map.outstanding

    @property
    def outstanding(self) -> list[int]:
        return sorted(self._outer)

    @property
    def pool(self) -> list[dict[str, Any]]:
        """The groups left: members (source indices), coefficients over the sources, the chosen 2-D point."""
        return self._pool

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {**self._header(), "pool": self._pool, "step": self._step, "key_base": self._key_base,
                "gen_base": self._gen_base, "evaluated": self._evaluated,
                "outer": [[k, v["x"]] for k, v in sorted(self._outer.items())], "map": self._map.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_header(state)
        self._pool = [{**g, "members": [int(m) for m in g["members"]],
                       "coefficients": [float(v) for v in g["coefficients"]]} for g in state["pool"]]
        self._step = int(state["step"])
        self._key_base = int(state["key_base"])
        self._gen_base = int(state["gen_base"])
        self._evaluated = [{"x": [float(v) for v in e["x"]],
                            "values": None if e["values"] is None else [float(v) for v in e["values"]]}
                           for e in state["evaluated"]]
        self._outer = {int(k): {"x": [float(v) for v in x]} for k, x in state["outer"]}
        self._map = self._new_map()
        self._map.load_state_dict(state["map"])
