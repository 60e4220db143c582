"""Study events: the run's news worth keeping (a node lost, workers back), newest last."""

from __future__ import annotations

from datetime import datetime
from typing import NamedTuple

from sqlalchemy import select

from .engine import Database
from .models import StudyEvent
from .studies import study_id
from .values import aware, now

EVENT_KINDS = ("node_lost", "workers_back")  # what the run writes today; the column takes any short word


class EventRow(NamedTuple):
    time: datetime
    kind: str
    message: str


class EventMethods:
    db: Database

    def add_study_event(self, study: str, kind: str, message: str) -> None:
        """Record one event of the study's run, stamped now."""
        if not isinstance(kind, str) or not kind or len(kind) > 32:
            raise ValueError(f"event kind must be a non-empty string of at most 32 characters, got {kind!r}")
        with self.db.session(write=True) as s:
            s.add(StudyEvent(study_id=study_id(s, study), time=now(), kind=kind, message=str(message)))

    def study_events(self, study: str, limit: int | None = None) -> list[EventRow]:
        """The study's events in the order they happened; with ``limit``, only the newest ``limit``."""
        with self.db.session() as s:
            q = select(StudyEvent.time, StudyEvent.kind, StudyEvent.message).where(
                StudyEvent.study_id == study_id(s, study)
            )
            if limit is not None:
                rows = s.execute(q.order_by(StudyEvent.id.desc()).limit(max(int(limit), 0))).all()[::-1]
            else:
                rows = s.execute(q.order_by(StudyEvent.id)).all()
        return [EventRow(aware(t), k, m) for t, k, m in rows]  # type: ignore[arg-type]
