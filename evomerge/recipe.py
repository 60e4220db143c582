"""Recipe: the complete, hashable description of one merged model.

A recipe names the base model, the source models, the merge method, and per layer group the
per-source coefficients (weight, density, ...). Anyone holding the source models can rebuild the
candidate from it, so the store keeps recipes, never weights.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

RECIPE_VERSION = 1

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def tensor_slot(name: str) -> str | int:
    """Where a tensor sits in a decoder: 'embed', a block index, or 'head'.

    Names follow the Hugging Face decoder convention (``model.embed_tokens``, ``model.layers.N.*``,
    ``model.norm``, ``lm_head``); anything outside the blocks that is not an embedding belongs to the
    head, which is where final norms and output projections live in every Llama-like family.
    """
    m = _LAYER_RE.search(name)
    if m:
        return int(m.group(1))
    if "embed" in name or "wte" in name or "wpe" in name:
        return "embed"
    return "head"


class LayerGroup(BaseModel):
    """A set of tensors that share one gene set: the embeddings, a run of blocks, or the head."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    kind: Literal["embed", "blocks", "head"]
    # Half-open block range [start, stop) for kind == "blocks".
    start: int | None = None
    stop: int | None = None
    # One entry per source model (same order as Recipe.sources).
    weights: list[float]
    densities: list[float] | None = None

    @model_validator(mode="after")
    def _check(self) -> LayerGroup:
        if self.kind == "blocks" and (self.start is None or self.stop is None or self.stop <= self.start):
            raise ValueError(f"group {self.name!r}: blocks need 0 <= start < stop")
        if self.densities is not None and len(self.densities) != len(self.weights):
            raise ValueError(f"group {self.name!r}: densities and weights differ in length")
        return self

    def contains(self, slot: str | int) -> bool:
        if isinstance(slot, int):
            return self.kind == "blocks" and self.start <= slot < self.stop  # type: ignore[operator]
        return self.kind == slot


class Recipe(BaseModel):
    """A parameter-space merge: one method, per-group coefficients over the source models."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int = RECIPE_VERSION
    kind: Literal["parameter_space"] = "parameter_space"
    base: str
    sources: list[str]
    method: str
    # Method-wide parameters that are not per source (e.g. {"lambda": 1.0}).
    params: dict[str, Any] = Field(default_factory=dict)
    groups: list[LayerGroup]
    # Seed for stochastic operators (DARE's drop mask); part of the recipe so it rebuilds exactly.
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> Recipe:
        k = len(self.sources)
        for g in self.groups:
            if len(g.weights) != k:
                raise ValueError(f"group {g.name!r} has {len(g.weights)} weights for {k} sources")
        return self

    def group_for(self, tensor_name: str) -> LayerGroup:
        slot = tensor_slot(tensor_name)
        for g in self.groups:
            if g.contains(slot):
                return g
        raise KeyError(f"no layer group covers tensor {tensor_name!r} (slot {slot!r})")

    def canonical_json(self) -> str:
        # Rounded floats keep the hash stable across JSON round trips and tiny float noise.
        def rnd(v: Any) -> Any:
            if isinstance(v, float):
                return round(v, 10)
            if isinstance(v, list):
                return [rnd(x) for x in v]
            if isinstance(v, dict):
                return {kk: rnd(vv) for kk, vv in v.items()}
            return v

        return json.dumps(rnd(self.model_dump(mode="json")), sort_keys=True, separators=(",", ":"))

    def hash(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()[:16]

    @classmethod
    def from_json(cls, text: str) -> Recipe:
        return cls.model_validate_json(text)
