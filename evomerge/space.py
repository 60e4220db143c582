"""The search space: a validated YAML file that says what to merge, how to score it, and how to search."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from evomerge.dfs.spec import DataFlowGenomeSpec
from evomerge.fidelity import MultiFidelity

ZOO_PREFIX = "zoo://"
# lm-eval metrics whose task score is the mean of per-example scores in [0, 1].
FIDELITY_METRICS = {"exact_match", "acc", "acc_norm"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class SpaceError(ValueError):
    """A search space that cannot be used; the message is one line naming the field."""


class Objective(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    # lm_eval: an lm-eval task; cost: a property of the merged model (no evaluation needed).
    kind: Literal["lm_eval", "cost"] = "lm_eval"
    # lm-eval task name (looked up in the space's task_paths) or a path to a task YAML file.
    task: str | None = None
    # lm-eval metric key, "metric,filter" as lm-eval reports it (e.g. "exact_match,none").
    metric: str | None = None
    # For kind == cost: "params" (non-zero parameters of the candidate); for data-flow candidates also
    # "path_length" (blocks on the path) and "path_params" (parameters the path uses, shared ones once).
    measure: Literal["params", "path_length", "path_params"] | None = None
    direction: Literal["maximize", "minimize"] = "maximize"
    limit: int | None = Field(default=None, gt=0)
    # Weight in the scalarised objective of single-objective algorithms (CMA-ES).
    weight: float = 1.0

    @model_validator(mode="after")
    def _check(self) -> Objective:
        if self.kind == "lm_eval" and (not self.task or not self.metric):
            raise ValueError("an lm_eval objective needs task and metric")
        if self.kind == "cost" and self.measure is None:
            raise ValueError("a cost objective needs measure")
        return self


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


def _genome_type(v: Any) -> str:
    # Spaces written before data-flow genomes existed have no `type:`; they are parameter-space.
    if isinstance(v, dict):
        return v.get("type", "parameter_space")
    return getattr(v, "type", "parameter_space")


GenomeSpec = Annotated[
    Annotated[Genome, Tag("parameter_space")] | Annotated[DataFlowGenomeSpec, Tag("data_flow")],
    Discriminator(_genome_type),
]


class Algorithm(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "nsga2"
    settings: dict[str, Any] = Field(default_factory=dict)


class Evaluation(BaseModel):
    model_config = ConfigDict(extra="forbid")

    batch_size: int = Field(default=32, gt=0)
    # Directories or YAML files holding lm-eval task definitions (relative to the space file).
    task_paths: list[str] = Field(default_factory=list)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    max_attempts: int = Field(default=3, ge=1)
    # Score a slice of each objective first; finish only candidates that can still reach the front.
    multi_fidelity: MultiFidelity | None = None
    # Build candidates with the torch.compile'd fused kernels (evomerge.merge.kernels) for linear,
    # task_arithmetic, ties, dare, dare_ties, della, della_linear, slerp and model_stock. "auto": on
    # when the worker's device is CUDA (Triton compiles in seconds); on CPU (where a compile costs
    # 5-60 s per worker process, more than a demo search's whole merge time) the C kernels of
    # evomerge.merge.native instead, which need no compile, for all of those but DELLA. "on": always;
    # a worker where torch.compile does not work falls back to the eager operators, and its info()
    # says which it uses. "off": never. Fused and eager agree up to float32 summation order; data-flow
    # genomes have no fused kernels and ignore the setting. YAML booleans (unquoted on/off) count as on/off.
    fused_kernels: Literal["auto", "on", "off"] = "auto"

    @field_validator("fused_kernels", mode="before")
    @classmethod
    def _on_off(cls, v: Any) -> Any:
        # YAML 1.1 (PyYAML) reads an unquoted on/off (also yes/no, true/false) as a boolean.
        if isinstance(v, bool):
            return "on" if v else "off"
        return v


class SearchSpace(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    description: str = ""
    # Local folders, hub ids, or zoo://NAME for the project's demo models. A data-flow genome needs no
    # base: it wires the source models' own layers.
    base_model: str | None = None
    models: list[str] = Field(min_length=1)
    genome: GenomeSpec = Field(default_factory=Genome)
    objectives: list[Objective] = Field(min_length=1)
    # Objectives evaluated on the final front only, never used to steer the search.
    report: list[Objective] = Field(default_factory=list)
    algorithm: Algorithm = Field(default_factory=Algorithm)
    evaluation: Evaluation = Field(default_factory=Evaluation)
    budget: int = Field(default=50, gt=0)
    seed: int = 0
    storage: str | None = None
    # Where the file was loaded from; relative paths in the space resolve against it.
    source_dir: Path | None = Field(default=None, exclude=True)

    @field_validator("base_model")
    @classmethod
    def _ref(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("must name a model")
        return v

    @model_validator(mode="after")
    def _unique(self) -> SearchSpace:
        names = [o.name for o in self.objectives + self.report]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"objective names must be unique, repeated: {sorted(dup)}")
        if self.evaluation.multi_fidelity is not None:
            for o in self.objectives:
                if o.kind == "lm_eval" and o.metric.split(",")[0] not in FIDELITY_METRICS:
                    raise ValueError(f"multi_fidelity needs per-example scores in [0, 1] with a mean "
                                     f"(exact_match, acc, ...); objective {o.name!r} is {o.metric}")
        self.genome.check_models(len(self.models))
        if isinstance(self.genome, Genome) and self.base_model is None:
            raise ValueError("a parameter-space genome needs base_model")
        if self.base_model is not None and self.base_model in self.models:
            raise ValueError("the base model must not be one of the source models")
        zoo_refs = [r for r in self.model_refs if r.startswith(ZOO_PREFIX)]
        if zoo_refs:
            from evomerge.zoo import ZOO_MODELS

            for r in zoo_refs:
                if r[len(ZOO_PREFIX):].strip("/") not in ZOO_MODELS:
                    raise ValueError(f"unknown zoo model {r!r}; the zoo has {', '.join(ZOO_MODELS)}")
        return self

    def model_ref(self, ref: str) -> str:
        """The portable form of a model reference, as recipes store it.

        zoo:// URIs and hub ids stay as they are, so a recipe rebuilds on any machine with the same
        sources; local folders become absolute paths.
        """
        if ref.startswith(ZOO_PREFIX):
            return ref
        local = self._rel(ref)
        if _HUB_ID.match(ref) and not local.exists():
            return ref
        return str(local.resolve())

    def resolve_path(self, ref: str) -> str:
        """A model reference as a process on this machine opens it."""
        return resolve_ref(self.model_ref(ref))

    def _rel(self, ref: str) -> Path:
        p = Path(ref).expanduser()
        if not p.is_absolute() and self.source_dir is not None:
            p = self.source_dir / p
        return p

    @property
    def task_dirs(self) -> list[str]:
        return [str(self._rel(p)) for p in self.evaluation.task_paths]

    @property
    def model_refs(self) -> list[str]:
        return [r for r in [self.base_model, *self.models] if r is not None]

    @property
    def uses_zoo(self) -> bool:
        return any(r.startswith(ZOO_PREFIX) for r in self.model_refs)

    def all_objectives(self) -> list[Objective]:
        return self.objectives + self.report


def resolve_ref(ref: str) -> str:
    """A recipe's model reference as a local path (zoo:// built on demand) or a hub id."""
    if ref.startswith(ZOO_PREFIX):
        from evomerge.zoo import resolve_zoo_uri

        return str(resolve_zoo_uri(ref))
    return ref


_UNION_TAGS = {"parameter_space", "data_flow"}


def _field_path(loc: tuple[Any, ...]) -> str:
    # pydantic puts the discriminator's tag into the location of a union member's errors.
    return ".".join(str(p) for p in loc if p not in _UNION_TAGS) or "<root>"


def load_space(path: str | Path) -> SearchSpace:
    """Read and validate a space file; any problem becomes one SpaceError line naming the field."""
    p = Path(path)
    if not p.is_file():
        raise SpaceError(f"{p}: no such file")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise SpaceError(f"{p}: not valid YAML{where}") from None
    if not isinstance(data, dict):
        raise SpaceError(f"{p}: the top level must be a mapping")
    try:
        space = SearchSpace.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        msg = err["msg"].removeprefix("Value error, ")
        raise SpaceError(f"{p}: field '{_field_path(err['loc'])}': {msg}") from None
    space = space.model_copy(update={"source_dir": p.resolve().parent})
    if space.name is None:
        space = space.model_copy(update={"name": p.stem})
    return space


def portable_space(space: SearchSpace) -> SearchSpace:
    """The space with every reference made absolute, so it means the same from any directory."""

    def task_ref(o: Objective) -> Objective:
        if o.task and (o.task.endswith((".yaml", ".yml"))):
            return o.model_copy(update={"task": str(space._rel(o.task).resolve())})
        return o

    return space.model_copy(
        update={
            "base_model": space.model_ref(space.base_model) if space.base_model else None,
            "models": [space.model_ref(m) for m in space.models],
            "objectives": [task_ref(o) for o in space.objectives],
            "report": [task_ref(o) for o in space.report],
            "evaluation": space.evaluation.model_copy(
                update={"task_paths": [str(Path(p).resolve()) for p in space.task_dirs]}
            ),
            "source_dir": None,
        }
    )


def dump_space(space: SearchSpace) -> str:
    return yaml.safe_dump(portable_space(space).model_dump(mode="json"), sort_keys=False)


def parse_space_text(text: str, origin: str = "<stored space>") -> SearchSpace:
    try:
        return SearchSpace.model_validate(yaml.safe_load(text))
    except (ValidationError, yaml.YAMLError) as e:
        raise SpaceError(f"{origin}: the stored space no longer validates: {str(e).splitlines()[0]}") from None
