"""Algorithm checkpoints: the search state after each step, newest few kept per study."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from sqlalchemy import delete, select

from .engine import Database
from .models import Checkpoint
from .rows import CheckpointRow
from .studies import study_id
from .values import json_default, now


class CheckpointMethods:
    db: Database

    def save_checkpoint(
        self, study: str, step: int, algorithm: str, state: Mapping[str, Any], keep: int = 3
    ) -> None:
        """Store the algorithm's state after ``step`` (replacing one saved at the same step) and keep
        only the newest ``keep`` checkpoints of the study (``keep=0`` keeps all).

        ``state`` is stored as JSON text: plain data (dicts, lists, numbers, strings; numpy arrays
        are converted to lists); NaN and infinities survive the round trip.
        """
        try:
            state_text = json.dumps(state, default=json_default)
        except (TypeError, ValueError) as e:
            raise ValueError(f"checkpoint state of {algorithm} is not JSON serialisable: {e}") from None
        with self.db.session(write=True) as s:
            sid = study_id(s, study)
            ck = s.execute(
                select(Checkpoint).where(Checkpoint.study_id == sid, Checkpoint.step == int(step))
            ).scalar_one_or_none()
            if ck is None:
                ck = Checkpoint(study_id=sid, step=int(step))
                s.add(ck)
            ck.algorithm = str(algorithm)
            ck.state = state_text
            ck.created = now()
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
        with self.db.session() as s:
            sid = study_id(s, study)
            row = s.execute(
                select(Checkpoint.step, Checkpoint.algorithm, Checkpoint.state)
                .where(Checkpoint.study_id == sid)
                .order_by(Checkpoint.step.desc(), Checkpoint.id.desc())
                .limit(1)
            ).first()
        if row is None:
            return None
        return CheckpointRow(int(row[0]), row[1], json.loads(row[2]))
