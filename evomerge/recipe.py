"""Recipe: the complete, hashable description of one merged model.

A recipe names the base model, the source models, the merge method, and per layer group the
per-source coefficients (weight, density, ...). Anyone holding the source models can rebuild the
candidate from it, so the store keeps recipes, never weights.

Two optional extensions carry what one-off merges (``evomerge merge``, mergekit configs) need; both
are left out of :meth:`Recipe.canonical_json` while unset, so the hash of every recipe written before
them is unchanged:

- a :class:`LayerGroup` may have a ``filter`` (a substring of the tensor name, as mergekit's
  ``filter:``) and ``params`` (overrides of the method-wide parameters for its tensors). The first group
  in order that covers a tensor's slot and whose filter occurs in its name applies.
- ``Recipe.slices`` describes a layer-stacking merge (mergekit ``slices:``): the output's blocks are
  built slice by slice from layer ranges of the models, so the output may have another number of
  layers than the base. Such a recipe has no top-level ``groups``; each slice holds its own.
  ``evomerge.merge.mergekit_io`` builds these.
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
    """A set of tensors that share one gene set: the embeddings, a run of blocks, the head, or all."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    kind: Literal["embed", "blocks", "head", "all"]
    # Half-open block range [start, stop) for kind == "blocks".
    start: int | None = None
    stop: int | None = None
    # One entry per source model (same order as Recipe.sources).
    weights: list[float]
    densities: list[float] | None = None
    # Optional: only tensors whose name contains this substring (mergekit's ``filter``).
    filter: str | None = None
    # Optional: overrides of Recipe.params for this group's tensors (e.g. a per-layer SLERP t).
    params: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _check(self) -> LayerGroup:
        if self.kind == "blocks" and (self.start is None or self.stop is None or self.stop <= self.start):
            raise ValueError(f"group {self.name!r}: blocks need 0 <= start < stop")
        if self.densities is not None and len(self.densities) != len(self.weights):
            raise ValueError(f"group {self.name!r}: densities and weights differ in length")
        return self

    def contains(self, slot: str | int) -> bool:
        if self.kind == "all":
            return True
        if isinstance(slot, int):
            return self.kind == "blocks" and self.start <= slot < self.stop  # type: ignore[operator]
        return self.kind == slot

    def matches(self, tensor_name: str, slot: str | int | None = None) -> bool:
        """Whether this group applies to tensor ``tensor_name`` (its slot, and its filter if any)."""
        if slot is None:
            slot = tensor_slot(tensor_name)
        return self.contains(slot) and (self.filter is None or self.filter in tensor_name)


_OPTIONAL_GROUP_FIELDS = ("filter", "params")


def _find_group(groups: list[LayerGroup], tensor_name: str, slot: str | int | None = None) -> LayerGroup:
    if slot is None:
        slot = tensor_slot(tensor_name)
    for g in groups:
        if g.matches(tensor_name, slot):
            return g
    raise KeyError(f"no layer group covers tensor {tensor_name!r} (slot {slot!r})")


class SliceSource(BaseModel):
    """Blocks ``[start, stop)`` of one model, an input of a :class:`LayerSlice`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    start: int
    stop: int

    @model_validator(mode="after")
    def _check(self) -> SliceSource:
        if not 0 <= self.start < self.stop:
            raise ValueError(f"slice source {self.model!r}: need 0 <= start < stop, got [{self.start}, {self.stop})")
        return self


class LayerSlice(BaseModel):
    """A run of output blocks: block ``j`` of the slice merges block ``start + j`` of each source.

    ``sources`` lists every input as mergekit does; the entry whose model is the slice's base (``base``,
    default ``Recipe.base``) is the origin of the task vectors when the method needs a base, and the
    others are the merged models, in order: the weights of ``groups`` are per merged model. Block
    groups count blocks from the start of the slice; the first slice's ``embed`` group and the last
    slice's ``head`` group merge the tensors outside the blocks (from those slices' models).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    sources: list[SliceSource]
    base: str | None = None
    groups: list[LayerGroup]
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> LayerSlice:
        if not self.sources:
            raise ValueError("a slice needs at least one source")
        n = {s.stop - s.start for s in self.sources}
        if len(n) != 1:
            raise ValueError("all sources of a slice must span the same number of blocks")
        return self

    @property
    def n_layers(self) -> int:
        return self.sources[0].stop - self.sources[0].start

    def group_for(self, tensor_name: str, slot: str | int) -> LayerGroup:
        return _find_group(self.groups, tensor_name, slot)


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
    # Optional layer stacking (see the module docstring); None for an ordinary per-tensor merge.
    slices: list[LayerSlice] | None = None

    @model_validator(mode="after")
    def _check(self) -> Recipe:
        k = len(self.sources)
        for g in self.groups:
            if len(g.weights) != k:
                raise ValueError(f"group {g.name!r} has {len(g.weights)} weights for {k} sources")
        if self.slices is not None:
            if not self.slices:
                raise ValueError("slices, when given, must not be empty")
            if self.groups:
                raise ValueError("a recipe with slices keeps its groups in the slices (top-level groups must be empty)")
            known = {self.base, *self.sources}
            for i, sl in enumerate(self.slices):
                for src in sl.sources:
                    if src.model not in known:
                        raise ValueError(f"slice {i}: model {src.model!r} is neither the base nor a source")
        return self

    @property
    def has_overrides(self) -> bool:
        """Whether some group has a filter or parameter overrides (per-tensor coefficients)."""
        groups = list(self.groups) + [g for sl in self.slices or [] for g in sl.groups]
        return any(g.filter is not None or g.params for g in groups)

    def group_for(self, tensor_name: str) -> LayerGroup:
        """The group of tensor ``tensor_name``: the first that covers its slot and whose filter matches."""
        return _find_group(self.groups, tensor_name)

    def params_for(self, group: LayerGroup, slice_: LayerSlice | None = None) -> dict[str, Any]:
        """Method parameters for a group's tensors: recipe params, then slice params, then group params."""
        out = dict(self.params)
        if slice_ is not None:
            out.update(slice_.params)
        if group.params:
            out.update(group.params)
        return out

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

        data = self.model_dump(mode="json")
        # Optional extensions are omitted while unset, so older recipes keep their hashes.
        if data.get("slices") is None:
            data.pop("slices", None)

        def strip(groups: list[dict[str, Any]]) -> None:
            for g in groups:
                for key in _OPTIONAL_GROUP_FIELDS:
                    if g.get(key) is None:
                        g.pop(key, None)

        strip(data["groups"])
        for sl in data.get("slices") or []:
            strip(sl["groups"])
        return json.dumps(rnd(data), sort_keys=True, separators=(",", ":"))

    def hash(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()[:16]

    @classmethod
    def from_json(cls, text: str) -> Recipe:
        return cls.model_validate_json(text)
