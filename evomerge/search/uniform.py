"""Uniform random search: the baseline every other algorithm must beat.

No generation barrier: ``ask(n)`` always returns ``n`` proposals. The state is explicit: the key
counter, the outstanding keys and numpy's PCG64 state (its 128-bit integers stored as strings, so the
JSON survives any consumer). ``generation`` is ``key // pop_size`` so that dashboards can bin it like
the generational algorithms.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from evomerge.search.base import Algorithm, Proposal, register


@register
class RandomSearch(Algorithm):
    name = "random"
    default_settings = {"pop_size": 8, "max_evals": None}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._rng = np.random.Generator(np.random.PCG64(self.seed))
        self._next_key = 0
        self._outstanding: set[int] = set()
        self._n_told = 0

    def ask(self, n: int) -> list[Proposal]:
        n = int(n)
        if self.settings["max_evals"] is not None:
            n = max(0, min(n, int(self.settings["max_evals"]) - self._next_key))
        out = []
        pop = max(1, int(self.settings["pop_size"]))
        for _ in range(n):
            x = self._rng.random(self.dim)
            key = self._next_key
            self._next_key += 1
            self._outstanding.add(key)
            out.append(Proposal(key=key, x=[float(v) for v in x], parents=[], generation=key // pop))
        return out

    def tell(self, results: list[tuple[int, list[float] | None]]) -> None:
        for key, values in results:
            key = int(key)
            if key not in self._outstanding:
                continue
            self.to_min(values)  # validates the number of values
            self._outstanding.discard(key)
            self._n_told += 1

    @property
    def outstanding(self) -> list[int]:
        return sorted(self._outstanding)

    def done(self) -> bool:
        me = self.settings["max_evals"]
        return me is not None and self._next_key >= int(me)

    def state_dict(self) -> dict[str, Any]:
        st = self._rng.bit_generator.state
        return {
            **self._header(),
            "next_key": self._next_key,
            "outstanding": sorted(self._outstanding),
            "n_told": self._n_told,
            "rng": {
                "bit_generator": st["bit_generator"],
                "state": str(st["state"]["state"]),
                "inc": str(st["state"]["inc"]),
                "has_uint32": int(st["has_uint32"]),
                "uinteger": str(st["uinteger"]),
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_header(state)
        r = state["rng"]
        if r["bit_generator"] != "PCG64":
            raise ValueError(f"random: unsupported bit generator {r['bit_generator']!r}")
        self._rng = np.random.Generator(np.random.PCG64(self.seed))
        self._rng.bit_generator.state = {
            "bit_generator": "PCG64",
            "state": {"state": int(r["state"]), "inc": int(r["inc"])},
            "has_uint32": int(r["has_uint32"]),
            "uinteger": int(r["uinteger"]),
        }
        self._next_key = int(state["next_key"])
        self._outstanding = {int(k) for k in state["outstanding"]}
        self._n_told = int(state["n_told"])
