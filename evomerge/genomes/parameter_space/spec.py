"""The ``genome:`` block of a parameter-space search space (the default kind: no ``type:`` needed)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class Genome(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["parameter_space"] = "parameter_space"
    method: Literal["linear", "task_arithmetic", "ties", "dare", "dare_ties"] = "dare_ties"
    # How many contiguous runs of blocks get their own gene set ("block": one per block). The
    # embeddings and the head get one each, so the genome has layer_groups + 2 gene sets; "model" is
    # one gene set for every tensor (the coarsest granularity, e.g. for MAP's per-model coefficients).
    layer_groups: int | Literal["block", "model"] = 1
    # Block count of the base; read from its config.json when the base is a local folder, so only
    # needed for hub models the driver cannot open (dry runs on a laptop for a cluster space).
    num_layers: int | None = Field(default=None, gt=0)
    weight_bounds: tuple[float, float] = (0.0, 1.0)
    density_bounds: tuple[float, float] = (0.1, 1.0)
    # Method-wide parameters passed through to the operator (e.g. {"lambda": 1.0}).
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("weight_bounds", "density_bounds")
    @classmethod
    def _bounds(cls, v: tuple[float, float]) -> tuple[float, float]:
        if v[0] >= v[1]:
            raise ValueError("lower bound must be below upper bound")
        return v

    @field_validator("density_bounds")
    @classmethod
    def _density(cls, v: tuple[float, float]) -> tuple[float, float]:
        if v[0] < 0 or v[1] > 1:
            raise ValueError("densities lie in [0, 1]")
        return v

    @field_validator("layer_groups")
    @classmethod
    def _groups(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError("layer_groups must be >= 1, 'block' or 'model'")
        return v
