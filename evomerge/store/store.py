"""The evomerge store: studies, candidates, scores, checkpoints and leases in one SQL database.

One driver process writes (workers return results to the driver); the dashboard and the CLI read.
Every public method is one short transaction of its own, unless it runs inside
``with store.transaction():``, which groups several calls into one atomic transaction.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
from sqlalchemy import Engine, create_engine, delete, event, func, or_, select, text, true, update
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, NoSuchModuleError, OperationalError
from sqlalchemy.orm import Session

from .errors import CandidateNotFound, StorageOpenError, StoreError, StudyExists, StudyLocked, StudyNotFound
from .models import Candidate, Checkpoint, SampleScores, Score, Study

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

STUDY_STATUSES = ("running", "paused", "done", "failed")
CANDIDATE_STATES = ("queued", "running", "complete", "failed")
DIRECTIONS = ("minimize", "maximize")
_DIRECTION_ALIASES = {"min": "minimize", "max": "maximize", "minimise": "minimize", "maximise": "maximize"}
_ACTIVE = ("queued", "running")
_TERMINAL = ("complete", "failed")
_ADVISORY_LOCK_KEY = 0x65766F6D  # "evom": serialises concurrent schema upgrades on PostgreSQL
_SQLITE_BUSY_TIMEOUT_MS = 30_000
_MAX_ERROR_CHARS = 65_536
_WRITE = "evomerge_write"


def default_storage_url() -> str:
    """``$EVOMERGE_STORAGE`` if set, else ``sqlite:///<absolute path of ./evomerge.db>``."""
    env = os.environ.get("EVOMERGE_STORAGE", "").strip()
    if env:
        return env
    return "sqlite:///" + str(Path("evomerge.db").resolve())


# --------------------------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class StudyRow:
    id: int
    name: str
    space_yaml: str
    objectives: list[dict[str, Any]]
    reference_point: list[float] | None
    status: str
    budget: int | None
    created: datetime
    updated: datetime
    lease_owner: str | None
    lease_expires: datetime | None

    @property
    def objective_names(self) -> list[str]:
        return [o["name"] for o in self.objectives]

    @property
    def directions(self) -> list[str]:
        return [o["direction"] for o in self.objectives]


@dataclass(frozen=True)
class CandidateRow:
    number: int
    proposal_key: str
    genome: Any
    recipe_json: str
    recipe_hash: str
    parents: list[int]
    operator: str | None
    generation: int
    niche: Any
    state: str
    attempts: int
    error: str | None
    worker: str | None
    timings: dict[str, Any] | None
    told_step: int | None
    heartbeat: datetime | None
    created: datetime
    started: datetime | None
    finished: datetime | None
    scores: dict[str, float] = field(default_factory=dict)

    @property
    def recipe(self) -> Any:
        """The recipe as parsed JSON (``evomerge.recipe.Recipe.from_json(row.recipe_json)`` for the model)."""
        return json.loads(self.recipe_json)


class CheckpointRow(NamedTuple):
    step: int
    algorithm: str
    state: dict[str, Any]


# ------------------------------------------------------------------------------------------ helpers


def _now() -> datetime:
    """Naive UTC, the form every timestamp is stored in."""
    return datetime.now(UTC).replace(tzinfo=None)


def _aware(dt: datetime | None) -> datetime | None:
    return dt.replace(tzinfo=UTC) if dt is not None and dt.tzinfo is None else dt


def _json_strict(value: Any, what: str) -> Any:
    """Return ``value`` as plain JSON data (numpy arrays/scalars converted); reject NaN/inf."""
    try:
        return json.loads(json.dumps(value, allow_nan=False, default=_json_default))
    except ValueError as e:
        raise ValueError(f"{what} must be finite JSON data: {e}") from None
    except TypeError as e:
        raise ValueError(f"{what} is not JSON serialisable: {e}") from None


def _json_default(o: Any) -> Any:
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, (tuple, set, frozenset)):
        return list(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def _clean_timings(timings: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if timings is None:
        return None
    out: dict[str, Any] = {}
    for k, v in dict(timings).items():
        if isinstance(v, (np.generic,)):
            v = v.item()
        if isinstance(v, float) and not math.isfinite(v):
            v = None
        out[str(k)] = v
    return _json_strict(out, "timings")


def _as_float(value: Any) -> float | None:
    """``float(value)`` if it is a finite real number, else None."""
    if isinstance(value, (bool, np.bool_)):
        return float(value)
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _normalise_objectives(objectives: Sequence[Any]) -> list[dict[str, Any]]:
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
    return _json_strict(out, "objectives")


def _non_dominated(F: np.ndarray) -> np.ndarray:
    """Boolean mask of the non-dominated rows of ``F`` (n x m, every column minimised).

    Equal rows do not dominate each other, so duplicates are all kept.
    """
    F = np.asarray(F, dtype=float)
    n = F.shape[0]
    mask = np.ones(n, dtype=bool)
    for i in range(n):
        if not mask[i]:
            continue
        le = np.all(F <= F[i], axis=1)
        lt = np.any(F < F[i], axis=1)
        if np.any(le & lt):
            mask[i] = False
            continue
        # i dominates these: drop them now so later iterations skip them.
        dominated_by_i = np.all(F[i] <= F, axis=1) & np.any(F[i] < F, axis=1)
        mask &= ~dominated_by_i
    return mask


def _pack(values: Sequence[float]) -> bytes:
    return np.asarray(values, dtype="<f8").tobytes()


def _unpack(data: bytes) -> list[float]:
    return np.frombuffer(data, dtype="<f8").tolist()


def _parse_url(url: str | URL) -> URL:
    hint = "expected e.g. sqlite:///evomerge.db or postgresql+psycopg://user:password@host:5432/dbname"
    if not isinstance(url, (str, URL)) or not str(url).strip():
        raise ValueError(f"invalid storage URL {url!r}: {hint}")
    try:
        u = make_url(str(url).strip()) if isinstance(url, str) else url
    except ArgumentError:
        raise ValueError(f"invalid storage URL {str(url)!r}: {hint}") from None
    backend = u.get_backend_name()
    if backend == "postgres":  # Heroku-style scheme
        u = u.set(drivername="postgresql+psycopg")
    elif u.drivername == "postgresql":  # psycopg (3) is the driver evomerge installs
        u = u.set(drivername="postgresql+psycopg")
    if u.get_backend_name() not in ("sqlite", "postgresql"):
        raise ValueError(
            f"unsupported storage URL {u.render_as_string(hide_password=True)!r}: "
            "evomerge supports sqlite:/// and postgresql+psycopg:// URLs"
        )
    return u


def _candidate_row(c: Candidate, scores: dict[str, float] | None = None) -> CandidateRow:
    return CandidateRow(
        number=c.number,
        proposal_key=c.proposal_key,
        genome=c.genome,
        recipe_json=c.recipe_json,
        recipe_hash=c.recipe_hash,
        parents=list(c.parents or []),
        operator=c.operator,
        generation=c.generation,
        niche=c.niche,
        state=c.state,
        attempts=c.attempts,
        error=c.error,
        worker=c.worker,
        timings=c.timings,
        told_step=c.told_step,
        heartbeat=_aware(c.heartbeat),
        created=_aware(c.created),  # type: ignore[arg-type]
        started=_aware(c.started),
        finished=_aware(c.finished),
        scores=dict(scores or {}),
    )


def _study_row(s: Study) -> StudyRow:
    return StudyRow(
        id=s.id,
        name=s.name,
        space_yaml=s.space_yaml,
        objectives=list(s.objectives),
        reference_point=list(s.reference_point) if s.reference_point is not None else None,
        status=s.status,
        budget=s.budget,
        created=_aware(s.created),  # type: ignore[arg-type]
        updated=_aware(s.updated),  # type: ignore[arg-type]
        lease_owner=s.lease_owner,
        lease_expires=_aware(s.lease_expires),
    )


# -------------------------------------------------------------------------------------------- store


class Store:
    """Repository over one storage URL (``sqlite:///...`` or ``postgresql+psycopg://...``).

    Opening a store brings the schema to the newest revision through the Alembic migrations shipped
    in ``evomerge/store/migrations`` (``auto_upgrade=False`` refuses an old schema instead). A schema
    newer than this evomerge is always refused.
    """

    def __init__(
        self, url: str | URL | None = None, *, auto_upgrade: bool = True, echo: bool = False
    ) -> None:
        u = _parse_url(default_storage_url() if url is None else url)
        self.url = u
        self.dialect = u.get_backend_name()
        self._local = threading.local()
        kwargs: dict[str, Any] = {"echo": echo, "future": True}
        if self.dialect == "sqlite":
            kwargs["connect_args"] = {"timeout": _SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False}
        else:
            kwargs["pool_pre_ping"] = True
        try:
            engine = create_engine(u, **kwargs)
        except (ArgumentError, NoSuchModuleError, ImportError) as e:
            raise ValueError(f"invalid storage URL {self.safe_url!r}: {e}") from None
        if self.dialect == "sqlite":
            _configure_sqlite(engine)
        self.engine: Engine = engine
        # Connections from this engine start write transactions (BEGIN IMMEDIATE on SQLite, so a
        # read-then-write transaction never fails with SQLITE_BUSY half way).
        self._write_engine: Engine = engine.execution_options(**{_WRITE: True})
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except OperationalError as e:
            engine.dispose()
            msg = str(e.orig).strip().splitlines()[0] if e.orig is not None else str(e)
            raise StorageOpenError(f"cannot open storage {self.safe_url}: {msg}") from None
        try:
            self._check_schema(auto_upgrade)
        except BaseException:
            engine.dispose()
            raise

    # ----------------------------------------------------------------------------- plumbing

    @property
    def safe_url(self) -> str:
        """The URL with its password masked, for messages."""
        return self.url.render_as_string(hide_password=True)

    url_display = safe_url

    def __repr__(self) -> str:
        return f"Store({self.safe_url!r})"

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[Store]:
        """Group store calls made in this thread into one atomic transaction::

            with store.transaction():
                store.complete_candidate(study, n, scores, samples, timings)
                store.record_tell(study, step, "nsga2", algo.state_dict(), told=[n])

        Nested ``transaction()`` blocks join the outer one. An exception rolls everything back.
        """
        if getattr(self._local, "session", None) is not None:
            yield self
            return
        with Session(self._write_engine, expire_on_commit=False) as s, s.begin():
            self._local.session = s
            try:
                yield self
            finally:
                self._local.session = None

    @contextmanager
    def _tx(self, write: bool = True) -> Iterator[Session]:
        outer = getattr(self._local, "session", None)
        if outer is not None:
            yield outer
            return
        with Session(self._write_engine if write else self.engine, expire_on_commit=False) as s, s.begin():
            yield s

    # ---------------------------------------------------------------------------- migrations

    def _alembic_config(self):  # -> alembic.config.Config
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        cfg.set_main_option(
            "sqlalchemy.url", self.url.render_as_string(hide_password=False).replace("%", "%%")
        )
        return cfg

    def head_revision(self) -> str:
        from alembic.script import ScriptDirectory

        head = ScriptDirectory.from_config(self._alembic_config()).get_current_head()
        assert head is not None
        return head

    def current_revision(self) -> str | None:
        """The schema revision recorded in ``alembic_version`` (None for an empty database)."""
        from alembic.runtime.migration import MigrationContext

        with self.engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    def _known_revision(self, rev: str) -> bool:
        from alembic.script import ScriptDirectory

        try:
            return ScriptDirectory.from_config(self._alembic_config()).get_revision(rev) is not None
        except Exception:
            return False

    def _check_schema(self, auto_upgrade: bool) -> None:
        current, head = self.current_revision(), self.head_revision()
        #: the schema revision found when this store was opened (before any automatic upgrade)
        self.revision_at_open: str | None = current
        if current == head:
            return
        if current is not None and not self._known_revision(current):
            raise StorageOpenError(
                f"storage {self.safe_url} has schema revision {current}, newer than this evomerge "
                f"knows (head {head}); upgrade evomerge"
            )
        if not auto_upgrade:
            raise StorageOpenError(
                f"storage {self.safe_url} has schema revision {current or 'none'}, this evomerge needs "
                f"{head}; run `evomerge storage upgrade`"
            )
        self.upgrade()

    def upgrade(self) -> tuple[str | None, str]:
        """Apply the Alembic migrations up to head; a no-op at head. Returns (before, after)."""
        from alembic import command
        from alembic.runtime.migration import MigrationContext

        cfg = self._alembic_config()
        with self._write_engine.begin() as conn:
            if self.dialect == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _ADVISORY_LOCK_KEY})
            before = MigrationContext.configure(conn).get_current_revision()
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
            after = MigrationContext.configure(conn).get_current_revision()
        if before != after:
            log.info("storage %s upgraded from %s to %s", self.safe_url, before or "empty", after)
        return before, after  # type: ignore[return-value]

    # -------------------------------------------------------------------------------- studies

    @staticmethod
    def _study(s: Session, name: str, lock: bool = False) -> Study:
        q = select(Study).where(Study.name == name)
        if lock:
            q = q.with_for_update()
        st = s.execute(q).scalar_one_or_none()
        if st is None:
            raise StudyNotFound(name)
        return st

    @staticmethod
    def _study_id(s: Session, name: str) -> int:
        sid = s.execute(select(Study.id).where(Study.name == name)).scalar_one_or_none()
        if sid is None:
            raise StudyNotFound(name)
        return sid

    def create_study(
        self,
        name: str,
        space_yaml: str,
        objectives: Sequence[Mapping[str, Any]],
        budget: int | None,
        reference_point: Sequence[float] | None = None,
        status: str = "running",
    ) -> int:
        """Create a study and return its id. Raises ``StudyExists`` if the name is taken."""
        if not isinstance(name, str) or not name.strip() or len(name) > 255:
            raise ValueError(f"study name must be a non-empty string of at most 255 characters, got {name!r}")
        objs = _normalise_objectives(objectives)
        if budget is not None and (not isinstance(budget, (int, np.integer)) or budget < 0):
            raise ValueError(f"budget must be a non-negative integer or None, got {budget!r}")
        if status not in STUDY_STATUSES:
            raise ValueError(f"study status must be one of {STUDY_STATUSES}, got {status!r}")
        ref = self._check_reference_point(reference_point, len(objs))
        now = _now()
        try:
            with self._tx() as s:
                st = Study(
                    name=name,
                    space_yaml=space_yaml,
                    objectives=objs,
                    reference_point=ref,
                    status=status,
                    budget=None if budget is None else int(budget),
                    created=now,
                    updated=now,
                )
                with s.begin_nested():  # a savepoint, so a clash leaves an outer transaction usable
                    s.add(st)
                return st.id
        except IntegrityError:
            raise StudyExists(name) from None

    @staticmethod
    def _check_reference_point(ref: Sequence[float] | None, n: int) -> list[float] | None:
        if ref is None:
            return None
        vals = [_as_float(v) for v in ref]
        if len(vals) != n or any(v is None for v in vals):
            raise ValueError(f"reference point must be {n} finite numbers (one per objective), got {ref!r}")
        return vals  # type: ignore[return-value]

    def get_study(self, name: str) -> StudyRow:
        with self._tx(write=False) as s:
            return _study_row(self._study(s, name))

    def has_study(self, name: str) -> bool:
        with self._tx(write=False) as s:
            return s.execute(select(Study.id).where(Study.name == name)).first() is not None

    def free_study_name(self, base: str) -> str:
        """``base`` if no study has that name, else the first free ``base-2``, ``base-3``, ..."""
        with self._tx(write=False) as s:
            taken = set(
                s.execute(
                    select(Study.name).where(or_(Study.name == base, Study.name.like(f"{base}-%")))
                ).scalars()
            )
        if base not in taken:
            return base
        i = 2
        while f"{base}-{i}" in taken:
            i += 1
        return f"{base}-{i}"

    def study_counts(self, name: str) -> dict[str, int]:
        """Candidate counts of one study: queued, running, complete, failed, total, attempts."""
        with self._tx(write=False) as s:
            sid = self._study_id(s, name)
            rows = s.execute(
                select(
                    Candidate.state, func.count(Candidate.id), func.coalesce(func.sum(Candidate.attempts), 0)
                )
                .where(Candidate.study_id == sid)
                .group_by(Candidate.state)
            ).all()
        out = {k: 0 for k in CANDIDATE_STATES}
        attempts = 0
        for state, n, a in rows:
            out[state] = int(n)
            attempts += int(a)
        out["total"] = sum(out[k] for k in CANDIDATE_STATES)
        out["attempts"] = attempts
        return out

    def count_candidates(self, name: str) -> int:
        """How many candidates the study has, in any state."""
        with self._tx(write=False) as s:
            sid = self._study_id(s, name)
            return int(
                s.execute(select(func.count(Candidate.id)).where(Candidate.study_id == sid)).scalar() or 0
            )

    def study_names(self) -> list[str]:
        with self._tx(write=False) as s:
            return list(s.execute(select(Study.name).order_by(Study.id)).scalars())

    def list_studies(self) -> list[dict[str, Any]]:
        """One dict per study: study, state, budget, complete, failed, running, queued, attempts
        (evaluations started, retries included), total, objectives, created, updated, lease_owner,
        lease_expires."""
        with self._tx(write=False) as s:
            studies = s.execute(select(Study).order_by(Study.id)).scalars().all()
            counts = s.execute(
                select(
                    Candidate.study_id,
                    Candidate.state,
                    func.count(Candidate.id),
                    func.coalesce(func.sum(Candidate.attempts), 0),
                ).group_by(Candidate.study_id, Candidate.state)
            ).all()
        per: dict[int, dict[str, int]] = {}
        for sid, state, n, attempts in counts:
            d = per.setdefault(sid, {"attempts": 0})
            d[state] = int(n)
            d["attempts"] += int(attempts)
        out = []
        for st in studies:
            d = per.get(st.id, {})
            row = {
                "study": st.name,
                "state": st.status,
                "budget": st.budget,
                **{k: d.get(k, 0) for k in CANDIDATE_STATES},
                "attempts": d.get("attempts", 0),
            }
            row["total"] = sum(d.get(k, 0) for k in CANDIDATE_STATES)
            row.update(
                objectives=list(st.objectives),
                created=_aware(st.created),
                updated=_aware(st.updated),
                lease_owner=st.lease_owner,
                lease_expires=_aware(st.lease_expires),
            )
            out.append(row)
        return out

    def set_study_status(self, name: str, status: str) -> None:
        if status not in STUDY_STATUSES:
            raise ValueError(f"study status must be one of {STUDY_STATUSES}, got {status!r}")
        with self._tx() as s:
            st = self._study(s, name)
            st.status = status
            st.updated = _now()

    def set_reference_point(self, name: str, reference_point: Sequence[float] | None) -> None:
        with self._tx() as s:
            st = self._study(s, name)
            st.reference_point = self._check_reference_point(reference_point, len(st.objectives))
            st.updated = _now()

    def delete_study(self, name: str) -> None:
        """Delete a study and everything recorded for it."""
        with self._tx() as s:
            sid = self._study_id(s, name)
            cids = select(Candidate.id).where(Candidate.study_id == sid).scalar_subquery()
            # Explicit deletes: SQLite enforces ON DELETE CASCADE only with PRAGMA foreign_keys.
            s.execute(delete(Score).where(Score.candidate_id.in_(cids)))
            s.execute(delete(SampleScores).where(SampleScores.candidate_id.in_(cids)))
            s.execute(delete(Candidate).where(Candidate.study_id == sid))
            s.execute(delete(Checkpoint).where(Checkpoint.study_id == sid))
            s.execute(delete(Study).where(Study.id == sid))

    # ---------------------------------------------------------------------------------- lease

    def acquire_lease(self, study: str, owner: str, ttl_s: float, force: bool | str = False) -> datetime:
        """Take the study's lease for ``ttl_s`` seconds (or extend our own); returns its expiry.

        Raises ``StudyLocked`` while another owner holds an unexpired lease; an expired lease is
        taken over. Race-safe: one conditional UPDATE decides.

        ``force``: take the lease even though it is live, e.g. from a driver known to be dead. Pass
        the dead owner's id (``force=st.lease_owner``) to take it only from that owner (so two
        drivers that both saw the dead owner cannot both win); ``True`` takes it unconditionally.
        """
        if ttl_s <= 0:
            raise ValueError(f"lease ttl must be positive, got {ttl_s}")
        now = _now()
        expires = now + timedelta(seconds=float(ttl_s))
        with self._tx() as s:
            res = s.execute(
                update(Study)
                .where(
                    Study.name == study,
                    true()
                    if force is True
                    else or_(
                        Study.lease_owner.is_(None),
                        Study.lease_expires.is_(None),
                        Study.lease_expires < now,
                        Study.lease_owner == owner,
                        *([Study.lease_owner == force] if isinstance(force, str) and force else []),
                    ),
                )
                .values(lease_owner=owner, lease_expires=expires)
                .execution_options(synchronize_session=False)
            )
            if res.rowcount == 1:  # type: ignore[attr-defined]
                return _aware(expires)  # type: ignore[return-value]
            row = s.execute(select(Study.lease_owner, Study.lease_expires).where(Study.name == study)).first()
        if row is None:
            raise StudyNotFound(study)
        raise StudyLocked(study, row[0], _aware(row[1]))

    def renew_lease(self, study: str, owner: str, ttl_s: float) -> datetime:
        """Extend our lease; raises ``StudyLocked`` if it is no longer ours."""
        if ttl_s <= 0:
            raise ValueError(f"lease ttl must be positive, got {ttl_s}")
        expires = _now() + timedelta(seconds=float(ttl_s))
        with self._tx() as s:
            res = s.execute(
                update(Study)
                .where(Study.name == study, Study.lease_owner == owner)
                .values(lease_expires=expires)
                .execution_options(synchronize_session=False)
            )
            if res.rowcount == 1:  # type: ignore[attr-defined]
                return _aware(expires)  # type: ignore[return-value]
            row = s.execute(select(Study.lease_owner, Study.lease_expires).where(Study.name == study)).first()
        if row is None:
            raise StudyNotFound(study)
        if row[0] is None:
            raise StudyLocked(study, None, None, f"study {study}: the lease of {owner} was lost (released)")
        raise StudyLocked(study, row[0], _aware(row[1]))

    def release_lease(self, study: str, owner: str) -> bool:
        """Give the lease up if we hold it; returns whether we did."""
        with self._tx() as s:
            res = s.execute(
                update(Study)
                .where(Study.name == study, Study.lease_owner == owner)
                .values(lease_owner=None, lease_expires=None)
                .execution_options(synchronize_session=False)
            )
            if res.rowcount == 0:  # type: ignore[attr-defined]
                self._study_id(s, study)
            return bool(res.rowcount)  # type: ignore[attr-defined]

    # ----------------------------------------------------------------------------- candidates

    @staticmethod
    def _candidate(s: Session, sid: int, study: str, number: int, lock: bool = False) -> Candidate:
        q = select(Candidate).where(Candidate.study_id == sid, Candidate.number == int(number))
        if lock:
            q = q.with_for_update()
        c = s.execute(q).scalar_one_or_none()
        if c is None:
            raise CandidateNotFound(study, number)
        return c

    def add_candidate(
        self,
        study: str,
        proposal_key: str,
        genome: Any,
        recipe_json: str | Mapping[str, Any] | Any,
        recipe_hash: str,
        parents: Sequence[int] = (),
        generation: int = 0,
        operator: str | None = None,
        niche: Any = None,
    ) -> int:
        """Record a proposed candidate (state ``queued``) and return its number (1, 2, ... per study).

        Idempotent on (study, proposal_key): proposing the same key again returns the existing
        number and changes nothing. ``recipe_json`` is the recipe's canonical JSON text (a mapping or
        an object with ``canonical_json()`` is serialised here). ``parents`` are candidate numbers.
        """
        key = str(proposal_key)
        if not key or len(key) > 255:
            raise ValueError(
                f"proposal_key must be a non-empty string of at most 255 characters, got {key!r}"
            )
        genome_data = _json_strict(genome, "genome")
        if hasattr(recipe_json, "canonical_json"):
            recipe_json = recipe_json.canonical_json()
        elif not isinstance(recipe_json, str):
            recipe_json = json.dumps(
                _json_strict(recipe_json, "recipe"), sort_keys=True, separators=(",", ":")
            )
        parent_list = [int(p) for p in parents]
        niche_data = _json_strict(niche, "niche")
        with self._tx() as s:
            sid = self._study_id(s, study)
            existing = self._by_key(s, sid, key)
            if existing is not None:
                if existing[1] != recipe_hash:
                    log.warning(
                        "study %s: proposal %r was recorded with recipe %s, now proposed with %s; "
                        "keeping candidate %d as recorded",
                        study,
                        key,
                        existing[1],
                        recipe_hash,
                        existing[0],
                    )
                return existing[0]
            for _ in range(10):
                number = (
                    s.execute(select(func.max(Candidate.number)).where(Candidate.study_id == sid)).scalar()
                    or 0
                ) + 1
                try:
                    with s.begin_nested():
                        s.add(
                            Candidate(
                                study_id=sid,
                                number=number,
                                proposal_key=key,
                                genome=genome_data,
                                recipe_json=recipe_json,
                                recipe_hash=str(recipe_hash),
                                parents=parent_list,
                                operator=operator,
                                generation=int(generation),
                                niche=niche_data,
                                state="queued",
                                attempts=0,
                                created=_now(),
                            )
                        )
                    return number
                except IntegrityError:  # a concurrent writer took the number or the key
                    existing = self._by_key(s, sid, key)
                    if existing is not None:
                        return existing[0]
            raise StoreError(f"study {study}: could not allocate a candidate number (too much contention)")

    @staticmethod
    def _by_key(s: Session, sid: int, key: str) -> tuple[int, str] | None:
        row = s.execute(
            select(Candidate.number, Candidate.recipe_hash).where(
                Candidate.study_id == sid, Candidate.proposal_key == key
            )
        ).first()
        return (row[0], row[1]) if row is not None else None

    def _update_candidate(self, study: str, number: int, states: Sequence[str], **values: Any) -> bool:
        with self._tx() as s:
            sid = self._study_id(s, study)
            res = s.execute(
                update(Candidate)
                .where(
                    Candidate.study_id == sid, Candidate.number == int(number), Candidate.state.in_(states)
                )
                .values(**values)
                .execution_options(synchronize_session=False)
            )
            if res.rowcount == 0:  # type: ignore[attr-defined]
                self._candidate(s, sid, study, number)  # raises CandidateNotFound
                return False
            return True

    def mark_running(self, study: str, number: int, worker: str | None = None) -> bool:
        """Mark a queued (or re-dispatched running) candidate running on ``worker``; counts one attempt.

        Returns False (and changes nothing) if the candidate is already complete or failed.
        """
        now = _now()
        return self._update_candidate(
            study,
            number,
            _ACTIVE,
            state="running",
            attempts=Candidate.attempts + 1,
            worker=worker,
            started=now,
            heartbeat=now,
        )

    def heartbeat(self, study: str, numbers: int | Iterable[int]) -> int:
        """Refresh the heartbeat of running candidates; returns how many rows were touched."""
        nums = [int(numbers)] if isinstance(numbers, (int, np.integer)) else [int(n) for n in numbers]
        if not nums:
            return 0
        with self._tx() as s:
            sid = self._study_id(s, study)
            res = s.execute(
                update(Candidate)
                .where(Candidate.study_id == sid, Candidate.number.in_(nums), Candidate.state == "running")
                .values(heartbeat=_now())
                .execution_options(synchronize_session=False)
            )
            return int(res.rowcount)  # type: ignore[attr-defined]

    def complete_candidate(
        self,
        study: str,
        number: int,
        scores: Mapping[str, float],
        sample_scores: Mapping[str, Sequence[float]] | None = None,
        timings: Mapping[str, Any] | None = None,
    ) -> Literal["complete", "failed"] | None:
        """Record a candidate's result.

        Returns ``"complete"`` when recorded, ``"failed"`` when a score (or per-example score) is NaN,
        infinite or not a number (the candidate is recorded failed with that error, no scores kept),
        and None when the candidate was already complete or failed (a duplicate result from a
        retried task: nothing changes).
        Per-example scores are stored as float64 arrays, so they read back bit-exact.
        """
        bad: str | None = None
        clean: dict[str, float] = {}
        for k, v in dict(scores).items():
            f = _as_float(v)
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
        if not clean and bad is None:
            bad = "no scores returned"
        tim = _clean_timings(timings)
        now = _now()
        with self._tx() as s:
            sid = self._study_id(s, study)
            c = self._candidate(s, sid, study, number, lock=True)
            if c.state in _TERMINAL:
                return None
            c.finished = now
            c.heartbeat = now
            if tim is not None:
                c.timings = tim
            if bad is not None:
                c.state = "failed"
                c.error = bad
                return "failed"
            s.execute(delete(Score).where(Score.candidate_id == c.id))
            s.execute(delete(SampleScores).where(SampleScores.candidate_id == c.id))
            s.add_all(Score(candidate_id=c.id, objective=k, value=v) for k, v in clean.items())
            s.add_all(
                SampleScores(candidate_id=c.id, objective=k, count=int(a.size), data=_pack(a))
                for k, a in samples.items()
            )
            c.state = "complete"
            c.error = None
            return "complete"

    def add_scores(
        self,
        study: str,
        number: int,
        scores: Mapping[str, float],
        sample_scores: Mapping[str, Sequence[float]] | None = None,
    ) -> None:
        """Add or replace scores of a complete candidate (e.g. a held-out evaluation of the front)."""
        clean = {}
        for k, v in dict(scores).items():
            f = _as_float(v)
            if f is None:
                raise ValueError(f"non-finite score for objective {k!r}: {v!r}")
            clean[str(k)] = f
        samples = {
            str(k): np.asarray(v, dtype=np.float64).reshape(-1) for k, v in dict(sample_scores or {}).items()
        }
        for k, a in samples.items():
            if not np.all(np.isfinite(a)):
                raise ValueError(f"non-finite per-example score for objective {k!r}")
        with self._tx() as s:
            sid = self._study_id(s, study)
            c = self._candidate(s, sid, study, number, lock=True)
            if c.state != "complete":
                raise ValueError(f"study {study}: candidate {number} is {c.state}, not complete")
            if clean:
                s.execute(delete(Score).where(Score.candidate_id == c.id, Score.objective.in_(list(clean))))
                s.add_all(Score(candidate_id=c.id, objective=k, value=v) for k, v in clean.items())
            if samples:
                s.execute(
                    delete(SampleScores).where(
                        SampleScores.candidate_id == c.id, SampleScores.objective.in_(list(samples))
                    )
                )
                s.add_all(
                    SampleScores(candidate_id=c.id, objective=k, count=int(a.size), data=_pack(a))
                    for k, a in samples.items()
                )

    def fail_candidate(
        self, study: str, number: int, error: str, timings: Mapping[str, Any] | None = None
    ) -> bool:
        """Record a queued/running candidate as failed; returns False (no-op) if already complete/failed."""
        now = _now()
        values: dict[str, Any] = {"state": "failed", "error": str(error)[:_MAX_ERROR_CHARS], "finished": now}
        tim = _clean_timings(timings)
        if tim is not None:
            values["timings"] = tim
        return self._update_candidate(study, number, _ACTIVE, **values)

    def requeue(self, study: str, number: int) -> bool:
        """Put a running or failed candidate back in the queue (for a retry); the last error is kept.

        Returns False (no-op) for a complete candidate; True if it is now queued.
        """
        return self._update_candidate(
            study,
            number,
            ("queued", "running", "failed"),
            state="queued",
            worker=None,
            heartbeat=None,
            started=None,
            finished=None,
        )

    def requeue_stale(self, study: str, older_than_s: float) -> list[int]:
        """Re-queue running candidates whose last heartbeat (or start) is older than ``older_than_s``
        seconds; returns their numbers."""
        cutoff = _now() - timedelta(seconds=float(older_than_s))
        last_seen = func.coalesce(Candidate.heartbeat, Candidate.started, Candidate.created)
        with self._tx() as s:
            sid = self._study_id(s, study)
            cond = (Candidate.study_id == sid, Candidate.state == "running", last_seen < cutoff)
            nums = sorted(s.execute(select(Candidate.number).where(*cond)).scalars())
            if nums:
                s.execute(
                    update(Candidate)
                    .where(*cond, Candidate.number.in_(nums))
                    .values(state="queued", worker=None, heartbeat=None, started=None)
                    .execution_options(synchronize_session=False)
                )
            return nums

    def _rows(self, s: Session, sid: int, *conds: Any) -> list[CandidateRow]:
        cands = (
            s.execute(select(Candidate).where(Candidate.study_id == sid, *conds).order_by(Candidate.number))
            .scalars()
            .all()
        )
        if not cands:
            return []
        by_id: dict[int, dict[str, float]] = {c.id: {} for c in cands}
        q = select(Score.candidate_id, Score.objective, Score.value)
        if len(cands) <= 500:
            q = q.where(Score.candidate_id.in_(list(by_id)))
        else:
            q = q.join(Candidate, Candidate.id == Score.candidate_id).where(Candidate.study_id == sid)
        for cid, obj, val in s.execute(q):
            if cid in by_id:
                by_id[cid][obj] = val
        return [_candidate_row(c, by_id[c.id]) for c in cands]

    def candidates(self, study: str, state: str | Iterable[str] | None = None) -> list[CandidateRow]:
        """Candidates of a study in number order, with their scores; optionally only some states."""
        conds: list[Any] = []
        if state is not None:
            states = [state] if isinstance(state, str) else list(state)
            unknown = set(states) - set(CANDIDATE_STATES)
            if unknown:
                raise ValueError(
                    f"unknown candidate state(s) {sorted(unknown)}; states are {CANDIDATE_STATES}"
                )
            conds.append(Candidate.state.in_(states))
        with self._tx(write=False) as s:
            return self._rows(s, self._study_id(s, study), *conds)

    def get_candidate(self, study: str, number: int) -> CandidateRow:
        with self._tx(write=False) as s:
            sid = self._study_id(s, study)
            rows = self._rows(s, sid, Candidate.number == int(number))
            if not rows:
                raise CandidateNotFound(study, number)
            return rows[0]

    def pending_candidates(self, study: str) -> list[CandidateRow]:
        """Queued or running candidates (a resumed driver re-dispatches these)."""
        return self.candidates(study, _ACTIVE)

    def untold_candidates(self, study: str) -> list[CandidateRow]:
        """Complete or failed candidates not yet marked told by ``record_tell``: results that a
        resumed driver must tell the algorithm restored from ``latest_checkpoint``."""
        with self._tx(write=False) as s:
            return self._rows(
                s, self._study_id(s, study), Candidate.state.in_(_TERMINAL), Candidate.told_step.is_(None)
            )

    def find_by_hash(self, study: str, recipe_hash: str) -> CandidateRow | None:
        """The first complete candidate of the study with this recipe hash (a result cache), or None."""
        with self._tx(write=False) as s:
            sid = self._study_id(s, study)
            first = s.execute(
                select(func.min(Candidate.number)).where(
                    Candidate.study_id == sid,
                    Candidate.recipe_hash == recipe_hash,
                    Candidate.state == "complete",
                )
            ).scalar()
            if first is None:
                return None
            return self._rows(s, sid, Candidate.number == first)[0]

    def sample_scores(self, study: str, number: int) -> dict[str, list[float]]:
        """Per-example scores of a candidate, by objective ({} if none were recorded)."""
        with self._tx(write=False) as s:
            sid = self._study_id(s, study)
            c = self._candidate(s, sid, study, number)
            rows = s.execute(
                select(SampleScores.objective, SampleScores.data)
                .where(SampleScores.candidate_id == c.id)
                .order_by(SampleScores.objective)
            ).all()
        return {obj: _unpack(data) for obj, data in rows}

    # ---------------------------------------------------------------------------- checkpoints

    def save_checkpoint(
        self, study: str, step: int, algorithm: str, state: Mapping[str, Any], keep: int = 3
    ) -> None:
        """Store the algorithm's state after ``step`` (replacing one saved at the same step) and keep
        only the newest ``keep`` checkpoints of the study (``keep=0`` keeps all)."""
        self.record_tell(study, step, algorithm, state, told=(), keep=keep)

    def record_tell(
        self,
        study: str,
        step: int,
        algorithm: str,
        state: Mapping[str, Any],
        told: Iterable[int] = (),
        keep: int = 3,
    ) -> None:
        """Atomically save the algorithm state after a ``tell`` and mark the candidates it was told
        (``told``: candidate numbers) with ``told_step=step``. After a crash, ``latest_checkpoint``
        plus ``untold_candidates`` give exactly the results the restored algorithm has not seen.

        ``state`` is stored as JSON text: plain data (dicts, lists, numbers, strings; numpy arrays
        are converted to lists); NaN and infinities survive the round trip.
        """
        try:
            state_text = json.dumps(state, default=_json_default)
        except (TypeError, ValueError) as e:
            raise ValueError(f"checkpoint state of {algorithm} is not JSON serialisable: {e}") from None
        told_nums = [int(n) for n in told]
        with self._tx() as s:
            sid = self._study_id(s, study)
            existing = s.execute(
                select(Checkpoint).where(Checkpoint.study_id == sid, Checkpoint.step == int(step))
            ).scalar_one_or_none()
            if existing is None:
                s.add(
                    Checkpoint(
                        study_id=sid,
                        step=int(step),
                        algorithm=str(algorithm),
                        state=state_text,
                        created=_now(),
                    )
                )
            else:
                existing.algorithm = str(algorithm)
                existing.state = state_text
                existing.created = _now()
            if told_nums:
                s.execute(
                    update(Candidate)
                    .where(Candidate.study_id == sid, Candidate.number.in_(told_nums))
                    .values(told_step=int(step))
                    .execution_options(synchronize_session=False)
                )
            s.flush()
            if keep and keep > 0:
                old = (
                    s.execute(
                        select(Checkpoint.id)
                        .where(Checkpoint.study_id == sid)
                        .order_by(Checkpoint.step.desc(), Checkpoint.id.desc())
                        .offset(int(keep))
                    )
                    .scalars()
                    .all()
                )
                if old:
                    s.execute(delete(Checkpoint).where(Checkpoint.id.in_(old)))

    def latest_checkpoint(self, study: str) -> CheckpointRow | None:
        """(step, algorithm, state) of the checkpoint with the highest step, or None."""
        with self._tx(write=False) as s:
            sid = self._study_id(s, study)
            row = s.execute(
                select(Checkpoint.step, Checkpoint.algorithm, Checkpoint.state)
                .where(Checkpoint.study_id == sid)
                .order_by(Checkpoint.step.desc(), Checkpoint.id.desc())
                .limit(1)
            ).first()
        if row is None:
            return None
        return CheckpointRow(int(row[0]), row[1], json.loads(row[2]))

    # ---------------------------------------------------------------------------------- front

    def front(self, study: str) -> list[CandidateRow]:
        """Non-dominated complete candidates (under each objective's direction), in number order.

        Candidates missing a score for one of the study's objectives are left out.
        """
        with self._tx(write=False) as s:
            st = self._study(s, study)
            rows = self._rows(s, st.id, Candidate.state == "complete")
            objectives = list(st.objectives)
        names = [o["name"] for o in objectives]
        signs = np.array([1.0 if o["direction"] == "minimize" else -1.0 for o in objectives])
        rows = [r for r in rows if all(n in r.scores for n in names)]
        if not rows:
            return []
        F = np.array([[r.scores[n] for n in names] for r in rows], dtype=float) * signs
        mask = _non_dominated(F)
        return [r for r, keep in zip(rows, mask, strict=True) if keep]


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy's begin event emit BEGIN itself (pysqlite's implicit BEGIN breaks
        # savepoints and cannot take the write lock up front).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA busy_timeout={_SQLITE_BUSY_TIMEOUT_MS}")
            cur.execute("PRAGMA foreign_keys=ON")
        finally:
            cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(_WRITE) else "BEGIN")
