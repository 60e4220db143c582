"""Copy studies from one store to another (SQLite <-> PostgreSQL), every row, all or nothing.

What a study is in the store travels whole: the study (its space, objectives, reference point, status,
budget, timestamps), its candidates (genome, recipe, lineage, state, attempts, errors, timings, worker),
their scores and per-example scores (the same bytes), the algorithm checkpoints, the hypervolume
series and the run's events (every table that belongs to a study, as ``_PER_STUDY`` lists them), so a copied study
resumes exactly as the original would. Row ids are the destination's own; candidates keep their numbers,
and lineage refers to numbers. The study's lease is not copied: the copy is held by no driver, and a
``running`` study reads as interrupted there until ``evomerge resume`` takes it.

The source is read in one read-only transaction (a snapshot, even while a driver writes to it) and
the destination written in one transaction: a failure leaves nothing of the copy behind. A study name
the destination already holds is refused before anything is written.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Table, insert, select
from sqlalchemy.exc import IntegrityError

from .errors import StoreError, StudyNotFound
from .models import Candidate, Checkpoint, HypervolumePoint, SampleScores, Score, Study, StudyEvent
from .store import Store

_STUDIES: Table = Study.__table__  # type: ignore[assignment]
_CANDIDATES: Table = Candidate.__table__  # type: ignore[assignment]
_SCORES: Table = Score.__table__  # type: ignore[assignment]
_SAMPLES: Table = SampleScores.__table__  # type: ignore[assignment]
_CHECKPOINTS: Table = Checkpoint.__table__  # type: ignore[assignment]
_HV_POINTS: Table = HypervolumePoint.__table__  # type: ignore[assignment]
_EVENTS: Table = StudyEvent.__table__  # type: ignore[assignment]
# The tables whose rows belong to a study itself, each with the column that orders them.
_PER_STUDY = ((_CHECKPOINTS, _CHECKPOINTS.c.step), (_HV_POINTS, _HV_POINTS.c.evaluations), (_EVENTS, _EVENTS.c.id))

# Keys that are the database's own (row ids, and the ids rows point at): remapped, never copied.
_OWN_KEYS = {"id", "study_id", "candidate_id"}
_LEASE = {"lease_owner": None, "lease_expires": None}


class CopyRefused(StoreError, ValueError):
    """A copy that would overwrite or clash with what the destination holds; nothing was written."""


@dataclass
class StudyRows:
    """One study as rows of the store's tables, ids left out (candidates keep their numbers)."""

    study: dict[str, Any]
    candidates: list[dict[str, Any]] = field(default_factory=list)
    scores: list[dict[str, Any]] = field(default_factory=list)  # with "number": the candidate's number
    samples: list[dict[str, Any]] = field(default_factory=list)  # likewise
    per_study: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # table name -> rows

    @property
    def checkpoints(self) -> list[dict[str, Any]]:
        return self.per_study.get(_CHECKPOINTS.name, [])


@dataclass(frozen=True)
class CopiedStudy:
    source: str
    name: str
    candidates: int
    scores: int
    samples: int
    checkpoints: int

    @property
    def rows(self) -> int:
        return 1 + self.candidates + self.scores + self.samples + self.checkpoints


def _data(table: Table) -> list[Any]:
    return [c for c in table.columns if c.name not in _OWN_KEYS]


def _row(table: Table, r: Any) -> dict[str, Any]:
    return {c.name: r._mapping[c] for c in _data(table)}


def read_studies(conn: Connection, names: Sequence[str]) -> list[StudyRows]:
    """The named studies (in the order given) as rows, read through ``conn``."""
    out = []
    for name in names:
        st = conn.execute(select(_STUDIES).where(_STUDIES.c.name == name)).first()
        if st is None:
            raise StudyNotFound(name)
        sid = st._mapping[_STUDIES.c.id]
        rows = StudyRows(_row(_STUDIES, st))
        rows.candidates = [
            _row(_CANDIDATES, r)
            for r in conn.execute(
                select(_CANDIDATES).where(_CANDIDATES.c.study_id == sid).order_by(_CANDIDATES.c.number)
            )
        ]
        for table, dest in ((_SCORES, rows.scores), (_SAMPLES, rows.samples)):
            q = (
                select(_CANDIDATES.c.number, table)
                .join(_CANDIDATES, _CANDIDATES.c.id == table.c.candidate_id)
                .where(_CANDIDATES.c.study_id == sid)
                .order_by(_CANDIDATES.c.number, table.c.objective)
            )
            dest.extend({"number": r._mapping[_CANDIDATES.c.number], **_row(table, r)} for r in conn.execute(q))
        for s in rows.samples:
            s["data"] = bytes(s["data"])  # a memoryview on some drivers
        for table, order in _PER_STUDY:
            rows.per_study[table.name] = [
                _row(table, r) for r in conn.execute(select(table).where(table.c.study_id == sid).order_by(order))
            ]
        out.append(rows)
    return out


def write_study(conn: Connection, rows: StudyRows, name: str) -> None:
    """Insert one study's rows under ``name`` (the caller's transaction; ids are the destination's)."""
    study = {**rows.study, "name": name, **_LEASE}
    try:
        with conn.begin_nested():  # a savepoint: the clash is reported, not a broken transaction
            sid = conn.execute(insert(_STUDIES).returning(_STUDIES.c.id), study).scalar_one()
    except IntegrityError:
        raise CopyRefused(f"a study named {name!r} was created in the destination meanwhile; nothing copied") from None
    ids: dict[int, int] = {}
    if rows.candidates:
        got = conn.execute(
            insert(_CANDIDATES).returning(_CANDIDATES.c.number, _CANDIDATES.c.id, sort_by_parameter_order=True),
            [{**c, "study_id": sid} for c in rows.candidates],
        )
        ids = {int(n): int(i) for n, i in got}
    for table, items in ((_SCORES, rows.scores), (_SAMPLES, rows.samples)):
        if items:
            conn.execute(
                insert(table),
                [{k: v for k, v in r.items() if k != "number"} | {"candidate_id": ids[r["number"]]} for r in items],
            )
    for table, _ in _PER_STUDY:
        if rows.per_study.get(table.name):
            conn.execute(insert(table), [{**c, "study_id": sid} for c in rows.per_study[table.name]])


def _read_connection(store: Store) -> Any:
    # PostgreSQL's default (read committed) would let a driver's writes land between the queries;
    # repeatable read makes the whole read one snapshot. SQLite's read transaction is one already.
    engine = store.db.engine
    if store.db.dialect == "postgresql":
        engine = engine.execution_options(isolation_level="REPEATABLE READ")
    return engine.connect()


def study_names(store: Store) -> list[str]:
    with store.db.engine.connect() as conn:
        return list(conn.execute(select(_STUDIES.c.name).order_by(_STUDIES.c.id)).scalars())


def copy_studies(
    src_url: str, dst_url: str, study: str | None = None, rename: str | None = None
) -> list[CopiedStudy]:
    """Copy every study of ``src_url`` (or only ``study``, named ``rename`` at the destination if given)
    into ``dst_url``, whose schema is created or upgraded first. Raises ``CopyRefused`` when a name is
    taken there, ``StudyNotFound`` for an unknown ``study``; on any failure nothing is written."""
    if rename is not None and study is None:
        raise CopyRefused("a new name (--as) needs the one study to copy (--study)")
    if rename is not None and (not rename.strip() or len(rename) > 255):
        raise CopyRefused(f"study name must be a non-empty string of at most 255 characters, got {rename!r}")
    with Store(src_url, read_only=True) as src:
        names = [study] if study is not None else study_names(src)
        if study is not None and not src.has_study(study):
            raise StudyNotFound(study)
        with _read_connection(src) as conn, conn.begin():
            studies = read_studies(conn, names)
    targets = [rename or n for n in names]
    if len(set(targets)) != len(targets):  # cannot happen from one store; kept for callers' renames
        raise CopyRefused("two studies would get the same name at the destination")
    with Store(dst_url) as dst:
        taken = [n for n in targets if dst.has_study(n)]
        if taken:
            shown = ", ".join(repr(n) for n in taken[:3]) + (", ..." if len(taken) > 3 else "")
            hint = "pick another name with --as" if study is not None else "copy one study with --study and --as"
            raise CopyRefused(f"{dst.url_display} already holds {shown}; nothing copied ({hint})")
        with dst.db.session(write=True) as s:  # one transaction: all studies or none
            conn = s.connection()
            for rows, name in zip(studies, targets, strict=True):
                write_study(conn, rows, name)
    return [
        CopiedStudy(n, t, len(r.candidates), len(r.scores), len(r.samples), len(r.checkpoints))
        for n, t, r in zip(names, targets, studies, strict=True)
    ]
