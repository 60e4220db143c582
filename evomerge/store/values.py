"""How the store checks and converts what callers hand it: timestamps, JSON data, scores, objectives."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np

DIRECTIONS = ("minimize", "maximize")
_DIRECTION_ALIASES = {"min": "minimize", "max": "maximize", "minimise": "minimize", "maximise": "maximize"}


def now() -> datetime:
    """Naive UTC, the form every timestamp is stored in."""
    return datetime.now(UTC).replace(tzinfo=None)


def aware(dt: datetime | None) -> datetime | None:
    """A stored (naive UTC) timestamp as an aware UTC datetime."""
    return dt.replace(tzinfo=UTC) if dt is not None and dt.tzinfo is None else dt


def json_default(o: Any) -> Any:
    """``json.dumps`` fallback: numpy arrays and scalars, tuples and sets as plain data."""
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, (tuple, set, frozenset)):
        return list(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def json_strict(value: Any, what: str) -> Any:
    """``value`` as plain JSON data (numpy arrays/scalars converted); rejects NaN/inf, which
    PostgreSQL's json type cannot hold."""
    try:
        return json.loads(json.dumps(value, allow_nan=False, default=json_default))
    except ValueError as e:
        raise ValueError(f"{what} must be finite JSON data: {e}") from None
    except TypeError as e:
        raise ValueError(f"{what} is not JSON serialisable: {e}") from None


def clean_timings(timings: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Timings as JSON data; a non-finite duration becomes None rather than failing the result."""
    if timings is None:
        return None
    out: dict[str, Any] = {}
    for k, v in dict(timings).items():
        if isinstance(v, np.generic):
            v = v.item()
        if isinstance(v, float) and not math.isfinite(v):
            v = None
        out[str(k)] = v
    return json_strict(out, "timings")


def as_float(value: Any) -> float | None:
    """``float(value)`` if it is a finite real number, else None."""
    if isinstance(value, (bool, np.bool_)):
        return float(value)
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def clean_scores(
    scores: Mapping[str, Any], sample_scores: Mapping[str, Sequence[float]] | None
) -> tuple[dict[str, float], dict[str, np.ndarray], str | None]:
    """(finite scores, per-example float64 arrays, the first problem found or None)."""
    bad: str | None = None
    clean: dict[str, float] = {}
    for k, v in dict(scores).items():
        f = as_float(v)
        if f is None:
            bad = bad or f"non-finite score for objective {k!r}: {v!r}"
        else:
            clean[str(k)] = f
    samples: dict[str, np.ndarray] = {}
    for k, vals in dict(sample_scores or {}).items():
        try:
            arr = np.asarray(vals, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            bad = bad or f"per-example scores for objective {k!r} are not numbers"
            continue
        if not np.all(np.isfinite(arr)):
            bad = bad or f"non-finite per-example score for objective {k!r}"
        samples[str(k)] = arr
    return clean, samples, bad


def pack(values: np.ndarray) -> bytes:
    """Per-example scores as little-endian float64 bytes, so they read back bit-exact."""
    return np.asarray(values, dtype="<f8").tobytes()


def unpack(data: bytes) -> list[float]:
    return np.frombuffer(data, dtype="<f8").tolist()


def normalise_objectives(objectives: Sequence[Any]) -> list[dict[str, Any]]:
    """Objectives as JSON dicts with a unique ``name`` and ``direction`` 'minimize' or 'maximize'."""
    out: list[dict[str, Any]] = []
    for i, o in enumerate(objectives):
        if hasattr(o, "model_dump"):
            o = o.model_dump(mode="json")
        if not isinstance(o, Mapping) or "name" not in o:
            raise ValueError(f"objective {i} must be a mapping with 'name' and 'direction', got {o!r}")
        d = dict(o)
        direction = str(d.get("direction", "maximize")).lower()
        direction = _DIRECTION_ALIASES.get(direction, direction)
        if direction not in DIRECTIONS:
            raise ValueError(
                f"objective {d['name']!r}: direction must be 'minimize' or 'maximize', not {direction!r}"
            )
        d["name"] = str(d["name"])
        d["direction"] = direction
        out.append(d)
    if not out:
        raise ValueError("a study needs at least one objective")
    names = [d["name"] for d in out]
    if len(set(names)) != len(names):
        raise ValueError(f"objective names must be unique, got {names}")
    return json_strict(out, "objectives")


def check_reference_point(ref: Sequence[float] | None, n: int) -> list[float] | None:
    """``ref`` as n finite floats (one per objective), or None."""
    if ref is None:
        return None
    vals = [as_float(v) for v in ref]
    if len(vals) != n or any(v is None for v in vals):
        raise ValueError(f"reference point must be {n} finite numbers (one per objective), got {ref!r}")
    return vals  # type: ignore[return-value]
