"""The search space: a validated YAML file that says what to merge, how to score it, and how to search."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Union

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

from evomerge.fidelity import MultiFidelity
from evomerge.files import UnreadableFile, read_user_text
from evomerge.genomes import DEFAULT_KIND, KINDS, FieldError, SpaceError, check_space
from evomerge.objectives import KIND_TAGS, Objective, ObjectiveSpec
from evomerge.objectives.tasks import bad_task_path
from evomerge.study_refs import canonical_study_ref, is_study_ref
from evomerge.zoo import ZOO_PREFIX, parse_zoo_uri, resolve_ref

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# The largest integers the store's columns hold on every backend (SQLite and PostgreSQL INTEGER, BIGINT).
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1


def _genome_type(v: Any) -> str:
    # Spaces written before data-flow genomes existed have no `type:`; they are parameter-space.
    if isinstance(v, dict):
        return v.get("type", DEFAULT_KIND)
    return getattr(v, "type", DEFAULT_KIND)


# The `genome:` block: one spec per registered genome kind, told apart by its `type:` tag.
GenomeSpec = Annotated[
    Union[tuple(Annotated[k.spec, Tag(k.name)] for k in KINDS.values())],  # noqa: UP007 - built at run time
    Discriminator(_genome_type),
]


class Algorithm(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "nsga2"
    settings: dict[str, Any] = Field(default_factory=dict)


class Evaluation(BaseModel):
    model_config = ConfigDict(extra="forbid")

    batch_size: int = Field(default=32, gt=0, le=INT32_MAX)
    # Directories or YAML files holding lm-eval task definitions (relative to the space file).
    task_paths: list[str] = Field(default_factory=list)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    max_attempts: int = Field(default=3, ge=1, le=INT32_MAX)
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
    genome: GenomeSpec = Field(default_factory=KINDS[DEFAULT_KIND].spec)
    # Each entry is validated by the model of its `kind` (lm_eval when absent), see evomerge/objectives/kinds.
    objectives: list[ObjectiveSpec] = Field(min_length=1)
    # Objectives evaluated on the final front only, never used to steer the search.
    report: list[ObjectiveSpec] = Field(default_factory=list)
    algorithm: Algorithm = Field(default_factory=Algorithm)
    evaluation: Evaluation = Field(default_factory=Evaluation)
    # Bounded by the store's integer columns (budget) and the search libraries' seeds (non-negative, 64-bit).
    budget: int = Field(default=50, gt=0, le=INT32_MAX)
    seed: int = Field(default=0, ge=0, le=INT64_MAX)
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
    def _unique(self, info: ValidationInfo) -> SearchSpace:
        names = [o.name for o in self.objectives + self.report]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"objective names must be unique, repeated: {sorted(dup)}")
        if self.evaluation.multi_fidelity is not None:
            for o in self.objectives:
                problem = o.fidelity_problem()
                if problem:
                    raise ValueError(f"multi_fidelity needs per-example scores in [0, 1] with a mean; "
                                     f"objective {o.name!r} {problem}")
        # A space read from a file knows its folder now, so its models, tasks and scorers are checked on
        # disk (relative references need it); a stored space's files may have gone and are not.
        if info.context and info.context.get("source_dir") is not None:
            self.source_dir = Path(info.context["source_dir"])
        try:
            check_space(self)
            if self.source_dir is not None:
                self._check_references()
        except FieldError as e:
            raise e.validation_error(type(self).__name__) from None
        if self.base_model is not None and self.base_model in self.models:
            raise ValueError("the base model must not be one of the source models")
        zoo_refs = [r for r in self.model_refs if r.startswith(ZOO_PREFIX)]
        if zoo_refs:
            for r in zoo_refs:
                parse_zoo_uri(r)  # ValueError: unknown zoo model or version
        return self

    def _check_references(self) -> None:
        bad = bad_task_path(self.evaluation.task_paths, self.source_dir)
        if bad is not None:
            raise FieldError(f"evaluation.task_paths.{bad[0]}", bad[1])
        for part, objectives in (("objectives", self.objectives), ("report", self.report)):
            for i, o in enumerate(objectives):
                problem = o.missing_reference(self.source_dir, self.evaluation.task_paths)
                if problem is not None:
                    raise FieldError(f"{part}.{i}.{problem[0]}", problem[1])

    def model_ref(self, ref: str) -> str:
        """The portable form of a model reference, as recipes store it.

        zoo:// URIs and hub ids stay as they are, so a recipe rebuilds on any machine with the same
        sources; local folders become absolute paths; a stored candidate (study://STUDY/NUMBER) gets its
        storage written out (its own ``?storage=``, else the space's ``storage``, else the default).
        """
        if ref.startswith(ZOO_PREFIX):
            return ref
        if is_study_ref(ref):
            return canonical_study_ref(ref, self.storage)
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

    @property
    def zoo_versions(self) -> list[int]:
        """The demo zoo versions the space's zoo:// references name (zoo://NAME: the default one)."""
        return sorted({parse_zoo_uri(r)[0] for r in self.model_refs if r.startswith(ZOO_PREFIX)})

    @property
    def hub_models(self) -> list[str]:
        """The references that are hub ids: nothing on this machine to check, the workers fetch them."""
        refs = [r for r in self.model_refs if not r.startswith(ZOO_PREFIX) and not is_study_ref(r)]
        return [r for r in refs if not Path(self.model_ref(r)).is_absolute()]

    def all_objectives(self) -> list[Objective]:
        return self.objectives + self.report


_UNION_TAGS = {*KINDS, *KIND_TAGS}


def _field_path(loc: tuple[Any, ...]) -> str:
    # pydantic puts the discriminator's tag into the location of a union member's errors.
    return ".".join(str(p) for p in loc if p not in _UNION_TAGS) or "<root>"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _parse_yaml(text: str, origin: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise SpaceError(f"{origin}: not valid YAML{where}") from None
    except ValueError as e:  # Python refuses to read an integer of thousands of digits
        # (its message goes on with a hint for Python programmers, not for a space's author)
        raise SpaceError(f"{origin}: not valid YAML: {_one_line(str(e).split(';')[0])}") from None
    except RecursionError:
        raise SpaceError(f"{origin}: not valid YAML: nested too deeply") from None


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``data`` with each ``KEY=VALUE`` set: KEY a dotted path into the space (``budget``,
    ``algorithm.settings.pop_size``, ``objectives.0.limit``; missing mappings are created), VALUE read
    as YAML (``8`` an integer, ``[0, 1]`` a list, ``on`` a boolean). The result is validated like the file."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(p.strip() for p in parts):
            raise SpaceError(f"--set {item!r}: expected KEY=VALUE with KEY a dotted path, e.g. budget=20")
        value = _parse_yaml(raw, f"--set {key.strip()}")
        node: Any = data
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            where = ".".join(parts[: i + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise SpaceError(f"--set {key}: {where!r} is not an index of a list of {len(node)}")
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    if node.get(part) is None:
                        node[part] = {}
                    node = node[part]
            else:
                raise SpaceError(f"--set {key}: {'.'.join(parts[:i])!r} is a value, not a mapping or list")
    return data


def load_space(path: str | Path, overrides: Sequence[str] = ()) -> SearchSpace:
    """Read and validate a space file, with ``overrides`` (``KEY=VALUE``, see :func:`apply_overrides`)
    applied first; any problem becomes one SpaceError line naming the field."""
    p = Path(path)
    try:
        text = read_user_text(p)
    except UnreadableFile as e:
        raise SpaceError(f"{p}: {e}") from None
    data = _parse_yaml(text, str(p))
    if not isinstance(data, dict):
        raise SpaceError(f"{p}: the top level must be a mapping")
    data = apply_overrides(data, overrides)
    where = f"{p} with --set {' '.join(overrides)}" if overrides else str(p)
    try:
        space = SearchSpace.model_validate(data, context={"source_dir": p.resolve().parent})
    except ValidationError as e:
        err = e.errors()[0]
        msg = _one_line(err["msg"].removeprefix("Value error, "))
        raise SpaceError(f"{where}: field '{_one_line(_field_path(err['loc']))}': {msg}") from None
    space = space.model_copy(update={"source_dir": p.resolve().parent})
    if space.name is None:
        space = space.model_copy(update={"name": p.stem})
    return space


def portable_space(space: SearchSpace) -> SearchSpace:
    """The space with every reference made absolute, so it means the same from any directory."""

    def task_ref(o: Objective) -> Objective:
        return o.portable(lambda ref: str(space._rel(ref).resolve()))

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


ORIGIN_MARK = "# evomerge origin: "


def dump_space(space: SearchSpace, file: str | Path | None = None, overrides: Sequence[str] = ()) -> str:
    """The space as a study stores it: every reference absolute (:func:`portable_space`), headed by a
    comment line recording where it came from (the file, the ``--set`` overrides, and each model
    reference as the user wrote it), which :func:`space_origin` reads back."""
    origin = {
        "file": str(Path(file).resolve()) if file is not None else None,
        "overrides": list(overrides),
        "names": {space.model_ref(r): r for r in space.model_refs},
    }
    body = yaml.safe_dump(portable_space(space).model_dump(mode="json"), sort_keys=False)
    return ORIGIN_MARK + json.dumps(origin) + "\n" + body


def space_origin(text: str) -> dict[str, Any]:
    """What :func:`dump_space` recorded of a stored space's origin (empty for spaces stored before it)."""
    first = text.split("\n", 1)[0]
    if not first.startswith(ORIGIN_MARK):
        return {}
    try:
        origin = json.loads(first[len(ORIGIN_MARK):])
    except ValueError:
        return {}
    return origin if isinstance(origin, dict) else {}


def parse_space_text(text: str, origin: str = "<stored space>") -> SearchSpace:
    try:
        return SearchSpace.model_validate(_parse_yaml(text, origin))
    except ValidationError as e:
        raise SpaceError(f"{origin}: the stored space no longer validates: {str(e).splitlines()[0]}") from None
