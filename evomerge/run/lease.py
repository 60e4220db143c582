"""The study lease: one run at a time searches a study; a lease left by a dead run is taken over."""

from __future__ import annotations

import os
import socket
import time
import uuid

from evomerge.store import Store, StudyLocked

LEASE_TTL_S = 60.0
LEASE_RENEW_S = 15.0


def owner_id() -> str:
    """host:pid:random, so that a run on this host can tell whether a lease's owner still lives."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def owner_is_dead_here(owner: str | None) -> bool:
    """A lease left by a run of this host whose process is gone (kill -9) can be taken at once."""
    if not owner:
        return False
    parts = owner.split(":")
    if len(parts) < 2 or parts[0] != socket.gethostname():
        return False
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError):
        return False
    return False


class Lease:
    """Holds a study's lease: ``acquire`` (raises ``StudyLocked`` while another live run holds it),
    ``renew_if_due`` from the loop, ``release`` at the end (also as a context manager)."""

    def __init__(self, store: Store, study: str, owner: str | None = None, ttl_s: float = LEASE_TTL_S,
                 renew_s: float = LEASE_RENEW_S) -> None:
        self.store = store
        self.study = study
        self.owner = owner or owner_id()
        self.ttl_s = ttl_s
        self.renew_s = renew_s
        self._renewed = time.monotonic()

    def acquire(self) -> None:
        try:
            self.store.acquire_lease(self.study, self.owner, self.ttl_s)
        except StudyLocked:
            holder = self.store.get_study(self.study).lease_owner
            if not owner_is_dead_here(holder):
                raise
            self.store.acquire_lease(self.study, self.owner, self.ttl_s, force=holder)
        self._renewed = time.monotonic()

    def renew_if_due(self) -> bool:
        """Renew when ``renew_s`` have passed since the last renewal; returns whether it did."""
        if time.monotonic() - self._renewed <= self.renew_s:
            return False
        self.store.renew_lease(self.study, self.owner, self.ttl_s)
        self._renewed = time.monotonic()
        return True

    def release(self) -> None:
        self.store.release_lease(self.study, self.owner)

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
