"""The objective kinds: every module in ``evomerge/objectives/kinds/`` is one, found at import.

A kind module defines ``KIND``, its :class:`~evomerge.objectives.base.Objective` subclass, whose ``kind``
literal is the module's name. :data:`ObjectiveSpec` is the union the space validates entries with.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Annotated, Any, Union

from pydantic import Discriminator, Tag, TypeAdapter

from evomerge.objectives import kinds as _kinds
from evomerge.objectives.base import DEFAULT_KIND, Objective


def _discover() -> dict[str, type[Objective]]:
    found: dict[str, type[Objective]] = {}
    for info in sorted(pkgutil.iter_modules(_kinds.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{_kinds.__name__}.{info.name}")
        cls = getattr(module, "KIND", None)
        if not (isinstance(cls, type) and issubclass(cls, Objective)):
            raise TypeError(f"{module.__name__}: an objective kind module defines KIND, an Objective subclass")
        if cls.model_fields["kind"].default != info.name:
            raise TypeError(f"{module.__name__}: KIND's kind must default to {info.name!r}, the module's name")
        found[info.name] = cls
    return found


KINDS: dict[str, type[Objective]] = _discover()


def _kind_of(v: Any) -> str:
    if isinstance(v, dict):
        return v.get("kind", DEFAULT_KIND)
    return getattr(v, "kind", DEFAULT_KIND)


# Annotated[..., Tag] per kind, discriminated by `kind`; pydantic puts the tag in error locations, which the
# space drops again (see KIND_TAGS) so that messages name the field as written.
ObjectiveSpec = Annotated[
    Union[tuple(Annotated[cls, Tag(name)] for name, cls in KINDS.items())],  # noqa: UP007 - built from the registry
    Discriminator(
        _kind_of,
        custom_error_type="objective_kind",
        custom_error_message=f"kind must be one of: {', '.join(KINDS)}",
    ),
]
KIND_TAGS = frozenset(KINDS)
_ADAPTER: TypeAdapter[Objective] = TypeAdapter(ObjectiveSpec)


def kind_class(kind: str | None) -> type[Objective]:
    """The model of objective kind ``kind`` (``lm_eval`` for None)."""
    try:
        return KINDS[kind or DEFAULT_KIND]
    except KeyError:
        raise ValueError(f"unknown objective kind {kind!r}; known: {', '.join(KINDS)}") from None


def parse_objective(data: Any, **kwargs: Any) -> Objective:
    """An objective of its kind from a mapping (a space entry, a worker config) or an objective."""
    return _ADAPTER.validate_python(data, **kwargs)


def is_bounded(objective: Objective) -> bool:
    """Whether the objective's value is known to lie in [0, 1] before any result."""
    return objective.is_bounded()


def supports_fidelity(objective: Objective) -> bool:
    """Whether the objective's value is a mean of per-example scores in [0, 1] (multi-fidelity can slice it)."""
    return objective.supports_fidelity()


Objective._kind_class = kind_class
Objective._parse = parse_objective
