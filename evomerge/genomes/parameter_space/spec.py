"""The ``genome:`` block of a parameter-space search space (the default kind: no ``type:`` needed)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from evomerge.genomes.checks import finite_bounds, finite_params

_NEEDS_DATA = ("per-source Fisher information computed from data, which a search does not supply; "
               "use it in a recipe for `evomerge merge`")


class Genome(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["parameter_space"] = "parameter_space"
    # Any registered merge operator (evomerge.merge.operators); its spec says which genes it has.
    method: str = "dare_ties"
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

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        # the registry imports torch: loaded when a space is validated, not when the CLI starts
        from evomerge.merge.operators import OPERATORS

        if v not in OPERATORS:
            raise ValueError(f"unknown merge method {v!r}; known: {', '.join(sorted(OPERATORS))}")
        if OPERATORS[v].needs_data():
            raise ValueError(f"method {v!r} needs {_NEEDS_DATA}")
        return v

    @field_validator("params")
    @classmethod
    def _params(cls, v: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        from evomerge.merge.operators import OPERATORS  # torch: see _method

        method = info.data.get("method")
        finite_params(v)
        if method is None:  # already refused
            return v
        try:
            needs_data = OPERATORS[method].needs_data(v)
        except (KeyError, ValueError):  # the merge reports bad params, as it did before this check (old spaces)
            return v
        if needs_data:
            raise ValueError(f"with these params method {method!r} needs {_NEEDS_DATA}")
        return v

    def check_models(self, n_models: int) -> None:
        """Cross-field check against the space's model list (call from SearchSpace's validator)."""
        from evomerge.merge.operators import get_operator  # torch: see _method

        try:
            get_operator(self.method).check_sources(n_models)
        except ValueError as e:
            raise ValueError(f"genome.method: {e}") from None

    @field_validator("weight_bounds", "density_bounds")
    @classmethod
    def _bounds(cls, v: tuple[float, float]) -> tuple[float, float]:
        return finite_bounds(v)

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
