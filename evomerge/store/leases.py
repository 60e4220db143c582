"""The study lease: at most one driver searches a study at a time.

Each call is one conditional UPDATE, so two drivers racing for a lease cannot both win.
"""

from __future__ import annotations

import os
import socket
import uuid
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_, select, true, update
from sqlalchemy.orm import Session

from .engine import Database
from .errors import StudyLocked, StudyNotFound
from .models import Study
from .values import aware, now


def owner_id() -> str:
    """host:pid:random, so that a reader on this host can tell whether a lease's owner still lives."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def owner_is_dead_here(owner: str | None) -> bool:
    """Whether ``owner`` (an ``owner_id``) is a process of this host that is gone (kill -9, a crash).

    False when it lives, when it is another host's (nothing here can tell) or not an ``owner_id``.
    """
    if not owner:
        return False
    parts = owner.split(":")
    if len(parts) < 2 or parts[0] != socket.gethostname():
        return False
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, OverflowError):
        return False
    return False


def _lease_holder(s: Session, study: str) -> Any:
    row = s.execute(select(Study.lease_owner, Study.lease_expires).where(Study.name == study)).first()
    if row is None:
        raise StudyNotFound(study)
    return row


def _check_ttl(ttl_s: float) -> None:
    if ttl_s <= 0:
        raise ValueError(f"lease ttl must be positive, got {ttl_s}")


class LeaseMethods:
    db: Database

    def acquire_lease(self, study: str, owner: str, ttl_s: float, force: bool | str = False) -> datetime:
        """Take the study's lease for ``ttl_s`` seconds (or extend our own); returns its expiry.

        Raises ``StudyLocked`` while another owner holds an unexpired lease; an expired lease is
        taken over.

        ``force``: take the lease even though it is live, e.g. from a driver known to be dead. Pass
        the dead owner's id (``force=st.lease_owner``) to take it only from that owner (so two
        drivers that both saw the dead owner cannot both win); ``True`` takes it unconditionally.
        """
        _check_ttl(ttl_s)
        t = now()
        expires = t + timedelta(seconds=float(ttl_s))
        free = or_(
            Study.lease_owner.is_(None),
            Study.lease_expires.is_(None),
            Study.lease_expires < t,
            Study.lease_owner == owner,
            *([Study.lease_owner == force] if isinstance(force, str) and force else []),
        )
        with self.db.session(write=True) as s:
            res = s.execute(
                update(Study)
                .where(Study.name == study, true() if force is True else free)
                .values(lease_owner=owner, lease_expires=expires)
                .execution_options(synchronize_session=False)
            )
            if res.rowcount == 1:  # type: ignore[attr-defined]
                return aware(expires)  # type: ignore[return-value]
            holder = _lease_holder(s, study)
        raise StudyLocked(study, holder[0], aware(holder[1]))

    def renew_lease(self, study: str, owner: str, ttl_s: float) -> datetime:
        """Extend our lease; raises ``StudyLocked`` if it is no longer ours."""
        _check_ttl(ttl_s)
        expires = now() + timedelta(seconds=float(ttl_s))
        with self.db.session(write=True) as s:
            res = s.execute(
                update(Study)
                .where(Study.name == study, Study.lease_owner == owner)
                .values(lease_expires=expires)
                .execution_options(synchronize_session=False)
            )
            if res.rowcount == 1:  # type: ignore[attr-defined]
                return aware(expires)  # type: ignore[return-value]
            holder = _lease_holder(s, study)
        if holder[0] is None:
            raise StudyLocked(study, None, None, f"study {study}: the lease of {owner} was lost (released)")
        raise StudyLocked(study, holder[0], aware(holder[1]))

    def release_lease(self, study: str, owner: str) -> bool:
        """Give the lease up if we hold it; returns whether we did."""
        with self.db.session(write=True) as s:
            res = s.execute(
                update(Study)
                .where(Study.name == study, Study.lease_owner == owner)
                .values(lease_owner=None, lease_expires=None)
                .execution_options(synchronize_session=False)
            )
            if res.rowcount == 0:  # type: ignore[attr-defined]
                _lease_holder(s, study)  # raises StudyNotFound
            return bool(res.rowcount)  # type: ignore[attr-defined]
