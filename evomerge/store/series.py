"""The hypervolume series and the light reads of a whole study (a table without genomes and recipes).

The run appends one hypervolume point per finished evaluation; the dashboard reads the series and the
study's table on every refresh, so both reads select only the columns they hand back: a study of
10,000 candidates is read in tens of milliseconds, not the seconds that full rows with their genomes
and recipes take.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import String, Text, case, cast, func, insert, or_, select, type_coerce

from .engine import Database
from .models import Candidate, HypervolumePoint, Score, Study
from .studies import find_study, study_id
from .values import aware, now

_ERROR_CHARS = 300  # a table row carries the start of the error; the candidate's own row has all of it

# The columns of ``study_table``, in its rows' order.
TABLE_COLUMNS = ("number", "state", "operator", "generation", "worker", "attempts", "started", "finished", "error",
                 "proposal_key", "estimated")
# The candidate columns of ``study_columns``.
COLUMNS = ("number", "state", "operator", "generation", "worker", "attempts", "started", "finished", "error",
           "estimated")


def _estimated() -> Any:
    """A candidate's ``timings.estimated`` in SQL (NULL unless its scores are anchor estimates): the
    queries' twin of ``CandidateRow.estimated``."""
    return Candidate.timings["estimated"].as_float()


def _time(v: datetime | str | None) -> datetime | None:
    return aware(datetime.fromisoformat(v) if isinstance(v, str) else v)


def _score_columns(numbers: np.ndarray, rows: list[Any]) -> dict[str, np.ndarray]:
    """(number, name, value) rows as one array per name aligned with ``numbers`` (ascending), NaN where
    a candidate has no such score: placed by numpy, not row by row."""
    if not rows or not len(numbers):
        return {}
    nums, names, values = zip(*rows, strict=True)
    which = sorted(set(names))
    index = {name: i for i, name in enumerate(which)}
    col = np.fromiter(map(index.__getitem__, names), dtype=np.intp, count=len(names))
    nums_ = np.fromiter(nums, dtype=np.int64, count=len(nums))
    pos = np.searchsorted(numbers, nums_).clip(max=len(numbers) - 1)
    # PostgreSQL reads each query at its own start: a candidate newer than the first query is left out
    ok = numbers[pos] == nums_
    out = np.full((len(which), len(numbers)), np.nan)
    out[col[ok], pos[ok]] = np.fromiter(values, dtype=float, count=len(values))[ok]
    return {name: out[i] for i, name in enumerate(which)}


class SeriesMethods:
    db: Database

    def add_hypervolume_points(
        self, study: str, points: Iterable[tuple[int, int, float, datetime | None]]
    ) -> int:
        """Record (evaluations, complete, hypervolume, when) points; a point whose ``evaluations`` the
        study already has is kept as it was (a resumed run replays nothing twice). Returns how many
        were added."""
        pts = [(int(e), int(c), float(v), t) for e, c, v, t in points]
        if not pts:
            return 0
        with self.db.session(write=True) as s:
            sid = study_id(s, study)
            have = set(
                s.execute(
                    select(HypervolumePoint.evaluations).where(
                        HypervolumePoint.study_id == sid,
                        HypervolumePoint.evaluations.in_([p[0] for p in pts]),
                    )
                ).scalars()
            )
            new = {}
            for e, c, v, t in pts:
                if e not in have:
                    new[e] = {"study_id": sid, "evaluations": e, "complete": c, "value": v,
                              "recorded": t.replace(tzinfo=None) if t is not None else now()}
            if new:  # one statement (the ORM's add_all sent one per point, the most of a turn's statements)
                s.execute(insert(HypervolumePoint.__table__), list(new.values()))
            return len(new)

    def hypervolume_series(self, study: str) -> list[dict[str, Any]]:
        """The stored points in evaluation order: evaluations, complete, value, recorded (aware UTC)."""
        with self.db.session() as s:
            sid = study_id(s, study)
            rows = s.execute(
                select(HypervolumePoint.evaluations, HypervolumePoint.complete, HypervolumePoint.value,
                       self._raw_time(HypervolumePoint.recorded))
                .where(HypervolumePoint.study_id == sid)
                .order_by(HypervolumePoint.evaluations)
            ).all()
        return [{"evaluations": e, "complete": c, "value": v, "recorded": _time(t)} for e, c, v, t in rows]

    def hypervolume_changes(self, study: str) -> list[dict[str, Any]]:
        """The points of the series where the value changed, and the last one: the same step curve as
        the whole series, from a few hundred rows instead of one per evaluation (the database picks
        them, with a window function)."""
        H = HypervolumePoint
        with self.db.session() as s:
            sid = study_id(s, study)
            prev = func.lag(H.value).over(order_by=H.evaluations).label("prev")
            last = func.max(H.evaluations).over().label("last")
            inner = (select(H.evaluations, H.complete, H.value, self._raw_time(H.recorded).label("recorded"),
                            prev, last)
                     .where(H.study_id == sid).subquery())
            rows = s.execute(
                select(inner.c.evaluations, inner.c.complete, inner.c.value, inner.c.recorded)
                .where(or_(inner.c.prev.is_(None), inner.c.value != inner.c.prev,
                           inner.c.evaluations == inner.c.last))
                .order_by(inner.c.evaluations)
            ).all()
        return [{"evaluations": e, "complete": c, "value": v, "recorded": _time(t)} for e, c, v, t in rows]

    def _raw_time(self, column: Any) -> Any:
        # times as the database's text on SQLite: datetime.fromisoformat reads 10,000 of them in a few
        # milliseconds, SQLAlchemy's own conversion takes ten times as long
        return type_coerce(column, String) if self.db.dialect == "sqlite" else column

    def last_hypervolume_evaluations(self, study: str) -> int:
        """The highest ``evaluations`` with a stored point (0 if none)."""
        last = self.last_hypervolume(study)
        return last["evaluations"] if last is not None else 0

    def last_hypervolume(self, study: str) -> dict[str, Any] | None:
        """The newest stored point (as in ``hypervolume_series``), or None."""
        with self.db.session() as s:
            sid = study_id(s, study)
            row = s.execute(
                select(HypervolumePoint.evaluations, HypervolumePoint.complete, HypervolumePoint.value,
                       HypervolumePoint.recorded)
                .where(HypervolumePoint.study_id == sid)
                .order_by(HypervolumePoint.evaluations.desc())
                .limit(1)
            ).first()
        if row is None:
            return None
        return {"evaluations": row[0], "complete": row[1], "value": row[2], "recorded": aware(row[3])}

    def study_table(self, study: str, after: int = 0) -> tuple[list[tuple], dict[int, dict[str, float]]]:
        """Every candidate of a study (numbered above ``after``) as a tuple of ``TABLE_COLUMNS`` (number
        order; times aware UTC, errors cut to their start, ``estimated`` whether its scores are anchor
        estimates), and the scores by candidate number, in two queries."""
        with self.db.session() as s:
            sid = study_id(s, study)
            started, finished = self._raw_time(Candidate.started), self._raw_time(Candidate.finished)
            rows = s.execute(
                select(Candidate.number, Candidate.state, Candidate.operator, Candidate.generation,
                       Candidate.worker, Candidate.attempts, started, finished,
                       func.substr(Candidate.error, 1, _ERROR_CHARS), Candidate.proposal_key,
                       _estimated())
                .where(Candidate.study_id == sid, Candidate.number > int(after))
                .order_by(Candidate.number)
            ).all()
            scores: dict[int, dict[str, float]] = {}
            for number, obj, val in s.execute(
                select(Candidate.number, Score.objective, Score.value)
                .join(Candidate, Candidate.id == Score.candidate_id)
                .where(Candidate.study_id == sid, Candidate.number > int(after))
            ):
                scores.setdefault(number, {})[obj] = val
        table = [(*r[:6], _time(r[6]), _time(r[7]), r[8], r[9], bool(r[10])) for r in rows]
        return table, scores

    def study_columns(self, study: str) -> dict[str, Any]:
        """Every candidate of a study column by column, in number order: a list per name of ``COLUMNS``,
        with ``started`` and ``finished`` as seconds since 1970 (floats, to the millisecond, None where
        unset), ``error`` (its start) for failed candidates only, ``estimated`` whether the scores are anchor
        estimates (no result: never on the front); and ``scores``, per score name an
        array of one value per candidate (NaN where it has none). What a page of the whole study draws,
        in two queries whose rows hold no datetimes and no ORM objects to build: the database computes
        the seconds, which took a third of the time when Python parsed 20,000 timestamps."""
        C = Candidate
        error = case((C.state == "failed", func.substr(C.error, 1, _ERROR_CHARS)), else_=None)
        with self.db.session() as s:
            sid = study_id(s, study)
            conn = s.connection()  # Core rows: the ORM's row processing was as slow as the query
            rows = conn.execute(
                select(C.number, C.state, C.operator, C.generation, C.worker, C.attempts,
                       self._epoch(C.started), self._epoch(C.finished), error,
                       _estimated().is_not(None))
                .where(C.study_id == sid)
                .order_by(C.number)
            ).all()
            score_rows = conn.execute(
                select(C.number, Score.objective, Score.value)
                .join(C, C.id == Score.candidate_id)
                .where(C.study_id == sid)
            ).all()
        out: dict[str, Any] = dict(zip(COLUMNS, map(list, zip(*rows, strict=True)), strict=True)) if rows else \
            {c: [] for c in COLUMNS}
        out["scores"] = _score_columns(np.asarray(out["number"], dtype=np.int64), score_rows)
        return out

    def _epoch(self, column: Any) -> Any:
        """Seconds since 1970 of a stored (naive UTC) time, as a float the database computes."""
        if self.db.dialect == "sqlite":  # julianday keeps milliseconds
            return (func.julianday(column) - 2440587.5) * 86400.0
        return func.date_part("epoch", column)  # double precision; the time's own value, as stored (UTC)

    def best_scores(self, study: str) -> dict[str, tuple[float, float]]:
        """Per score name, (lowest, highest) over the study's complete candidates scored in full (an anchor
        estimate is no result), in one query."""
        with self.db.session() as s:
            sid = study_id(s, study)
            rows = s.execute(
                select(Score.objective, func.min(Score.value), func.max(Score.value))
                .join(Candidate, Candidate.id == Score.candidate_id)
                .where(Candidate.study_id == sid, Candidate.state == "complete",
                       _estimated().is_(None))
                .group_by(Score.objective)
            ).all()
        return {obj: (lo, hi) for obj, lo, hi in rows}

    def lineage(self, study: str, number: int) -> tuple[list[int], list[int]]:
        """A candidate's parents and children as candidate numbers. The run stores parents as the
        proposal keys the algorithm gave them; they are mapped to numbers here. Children are found
        by their parents' JSON text first (a LIKE the database answers from the study's rows), then
        checked exactly, so a study's 10,000 parent lists are never all decoded."""
        with self.db.session() as s:
            sid = study_id(s, study)
            key, parents = s.execute(
                select(Candidate.proposal_key, Candidate.parents)
                .where(Candidate.study_id == sid, Candidate.number == int(number))
            ).one()
            keys = [str(p) for p in parents or []]
            by_key = dict(s.execute(
                select(Candidate.proposal_key, Candidate.number)
                .where(Candidate.study_id == sid, Candidate.proposal_key.in_(keys))
            ).all()) if keys else {}
            maybe = s.execute(
                select(Candidate.number, Candidate.parents)
                .where(Candidate.study_id == sid, cast(Candidate.parents, Text).like(f"%{int(key)}%"))
                .order_by(Candidate.number)
            ).all() if key.isdigit() else []
        children = [n for n, p in maybe if key in {str(x) for x in p or []}]
        return [by_key[k] for k in keys if k in by_key], children

    def study_stamp(self, study: str) -> dict[str, Any]:
        """What changes whenever anything of the study that a page shows changes: the status, the
        last update, the candidates per state and the newest finish. Two aggregate queries."""
        with self.db.session() as s:
            st = find_study(s, study)
            per = s.execute(
                select(Candidate.state, func.count(Candidate.id), func.max(Candidate.finished),
                       func.max(Candidate.started))
                .where(Candidate.study_id == st.id)
                .group_by(Candidate.state)
            ).all()
            status, updated = st.status, aware(st.updated)
        counts = {state: int(n) for state, n, _, _ in per}
        times = [aware(t) for _, _, f, r in per for t in (f, r) if t is not None]
        return {"status": status, "updated": updated, "counts": counts, "latest": max(times, default=None)}

    def study_names(self) -> list[str]:
        with self.db.session() as s:
            return list(s.execute(select(Study.name).order_by(Study.id)).scalars())
