"""DataFlowRecipe: the complete, hashable description of one data-flow (layer path) candidate.

The candidate runs the embeddings of ``models[embed_source]``, then the decoder blocks of ``path`` in
order -- step ``i`` multiplies the hidden state by ``scales[i]`` and feeds it to block
``path[i] = (model index, layer index)`` -- then the final norm and LM head of ``models[head_source]``.
The tokenizer is the embed source's. Anyone holding the models rebuilds the candidate from this.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, model_validator

DATAFLOW_RECIPE_VERSION = 1


def _rounded(v: Any) -> Any:
    if isinstance(v, float):
        return round(v, 10)
    if isinstance(v, list | tuple):
        return [_rounded(x) for x in v]
    if isinstance(v, dict):
        return {k: _rounded(x) for k, x in v.items()}
    return v


class DataFlowRecipe(BaseModel):
    """A layer path through the blocks of ``models`` with per-step input scales."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int = DATAFLOW_RECIPE_VERSION
    kind: Literal["data_flow"] = "data_flow"
    # Model references as recipes store them (zoo://NAME, hub id, absolute folder).
    models: list[str]
    # Block count of each model (same order), so the recipe validates without opening the models.
    num_layers: list[int]
    # One (model index, layer index) per step, in execution order.
    path: list[tuple[int, int]]
    # One input scale per step: the hidden state entering step i is multiplied by scales[i].
    scales: list[float]
    embed_source: int = 0
    head_source: int = 0

    @model_validator(mode="after")
    def _check(self) -> DataFlowRecipe:
        k = len(self.models)
        if k == 0:
            raise ValueError("a data-flow recipe needs at least one model")
        if len(self.num_layers) != k:
            raise ValueError(f"num_layers has {len(self.num_layers)} entries for {k} models")
        if len(self.scales) != len(self.path):
            raise ValueError(f"{len(self.scales)} scales for a path of {len(self.path)} steps")
        for m, layer in self.path:
            if not (0 <= m < k) or not (0 <= layer < self.num_layers[m]):
                raise ValueError(f"path step ({m}, {layer}) is not a block of the models")
        for f in ("embed_source", "head_source"):
            if not 0 <= getattr(self, f) < k:
                raise ValueError(f"{f} {getattr(self, f)} is not a model index")
        return self

    # -- derived -------------------------------------------------------------------------------

    @property
    def sources(self) -> list[str]:
        """Alias of ``models`` (what a worker loads), for code shared with parameter-space recipes."""
        return list(self.models)

    @property
    def path_length(self) -> int:
        return len(self.path)

    def unique_blocks(self) -> list[tuple[int, int]]:
        """The blocks the path uses, each once, in order of first use."""
        seen: dict[tuple[int, int], None] = {}
        for step in self.path:
            seen.setdefault(tuple(step), None)  # type: ignore[arg-type]
        return list(seen)

    # -- serialization -------------------------------------------------------------------------

    def canonical_json(self) -> str:
        # Rounded floats keep the hash stable across JSON round trips and tiny float noise.
        return json.dumps(_rounded(self.model_dump(mode="json")), sort_keys=True, separators=(",", ":"))

    def hash(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()[:16]

    @classmethod
    def from_json(cls, text: str) -> DataFlowRecipe:
        return cls.model_validate_json(text)

