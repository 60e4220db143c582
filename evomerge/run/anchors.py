"""The anchor plan of a study (multi-fidelity ``method: anchors``): which examples a new candidate is scored
on first, with their weights and the estimate's error bar, learned from the study's fully scored candidates.

Refitted whenever another fully scored candidate is in (a k-means over a few hundred examples: milliseconds);
each candidate's per-example scores are read from the store once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from evomerge.fidelity import MultiFidelity, plan_anchors
from evomerge.objectives import supports_fidelity
from evomerge.store import Store

if TYPE_CHECKING:
    from evomerge.space import SearchSpace


class AnchorPlanner:
    def __init__(self, store: Store, study: str, space: SearchSpace, fid: MultiFidelity) -> None:
        self.store, self.study, self.fid = store, study, fid
        self.names = [o.name for o in space.objectives if supports_fidelity(o)]
        self.seed = int(space.seed) % (2**32)
        self._samples: dict[int, dict[str, list[float]]] = {}
        self._plan: tuple[int, dict[str, Any]] | None = None

    def plan(self) -> dict[str, Any]:
        """Per objective ``{"indices", "weights", "error", "n"}``; {} until ``min_reference`` candidates are
        fully scored (until then every candidate is scored in full)."""
        full = [c for c in self.store.candidates(self.study, state="complete") if not (c.timings or {}).get("pruned")]
        if len(full) < self.fid.min_reference or not self.names:
            return {}
        if self._plan is not None and self._plan[0] == len(full):
            return self._plan[1]
        for c in full:
            if c.number not in self._samples:
                self._samples[c.number] = self.store.sample_scores(self.study, c.number)
        matrices = {}
        for name in self.names:
            rows = [self._samples[c.number].get(name) or [] for c in full]
            n = max((len(r) for r in rows), default=0)
            rows = [r for r in rows if len(r) == n]  # full evaluations only
            if n == 0 or len(rows) < self.fid.min_reference:
                return {}
            matrices[name] = np.asarray(rows, dtype=float)
        plan = plan_anchors(matrices, self.fid.fraction, self.seed, confirm=self.fid.confirm,
                            confirm_steps=self.fid.confirm_steps)
        self._plan = (len(full), plan)
        return plan
