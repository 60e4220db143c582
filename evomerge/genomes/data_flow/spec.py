"""The ``genome:`` block of a data-flow search space, as a pydantic model ``space.py`` can import.

In a space file::

    genome:
      type: data_flow
      repeats: 2                 # r: the layer sequence of all models is laid out r times
      scales: per_source_layer   # none | per_layer | per_source_layer | full
      scale_bounds: [0.5, 1.5]
      pin_first: true            # embed source's first block always opens the path
      pin_last: true             # head source's last block always closes the path
      embed_source: 0            # index into `models`: embeddings + tokenizer (model A)
      head_source: 0             # index into `models`: final norm + LM head

``num_layers`` (per model) is read from the models' config.json; give it only when a model folder is
not local (dry runs for a cluster space).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from evomerge.genomes.checks import finite_bounds

ScaleMode = Literal["none", "per_layer", "per_source_layer", "full"]

# Config fields every source must share so that any path runs and exports as one architecture.
ARCH_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "rms_norm_eps",
    "attention_bias",
    "mlp_bias",
    "rope_parameters",
    "max_position_embeddings",
    "vocab_size",
)
SUPPORTED_MODEL_TYPES = ("llama",)


class DataFlowGenomeSpec(BaseModel):
    """Genome settings of a data-flow (layer path) search; see :class:`evomerge.genomes.data_flow.DataFlowGenome`."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["data_flow"] = "data_flow"
    repeats: int = Field(default=2, ge=1, le=8)
    scales: ScaleMode = "per_source_layer"
    scale_bounds: tuple[float, float] = (0.5, 1.5)
    pin_first: bool = True
    pin_last: bool = True
    embed_source: int = Field(default=0, ge=0)
    head_source: int = Field(default=0, ge=0)
    # Block count of each model (same order as the space's `models`); read from config.json if None.
    num_layers: list[int] | None = None

    @field_validator("scale_bounds")
    @classmethod
    def _bounds(cls, v: tuple[float, float]) -> tuple[float, float]:
        return finite_bounds(v)

    @field_validator("num_layers")
    @classmethod
    def _layers(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and any(n < 1 for n in v):
            raise ValueError("every model needs at least one block")
        return v

    @model_validator(mode="after")
    def _check(self) -> DataFlowGenomeSpec:
        if self.num_layers is not None:
            k = len(self.num_layers)
            for f in ("embed_source", "head_source"):
                if getattr(self, f) >= k:
                    raise ValueError(f"{f} {getattr(self, f)} is not a model index (there are {k} models)")
        return self

    def check_models(self, n_models: int) -> None:
        """Cross-field check against the space's model list (call from SearchSpace's validator)."""
        if n_models < 1:
            raise ValueError("a data-flow genome needs at least one model")
        for f in ("embed_source", "head_source"):
            if getattr(self, f) >= n_models:
                raise ValueError(f"genome.{f} {getattr(self, f)} is not a model index ({n_models} models)")
        if self.num_layers is not None and len(self.num_layers) != n_models:
            raise ValueError(f"genome.num_layers has {len(self.num_layers)} entries for {n_models} models")
