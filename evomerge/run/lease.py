"""The study lease: one run at a time searches a study; a lease left by a dead run is taken over."""

from __future__ import annotations

import time
from datetime import datetime

from evomerge.store import Store, StudyLocked
from evomerge.store.leases import owner_id, owner_is_dead_here

LEASE_TTL_S = 60.0
LEASE_RENEW_S = 15.0


def refusal(study: str, owner: str | None, expires: datetime | None) -> str:
    """The one line a refused run prints: who holds the study, until when, and how to take over."""
    until = expires.strftime("%Y-%m-%d %H:%M:%S UTC") if expires is not None else "an unknown time"
    return (f"study {study} is being searched by {owner} (host:pid:id) until {until}, renewed while it runs; "
            f"wait for it to end, or once you have checked that process is gone take over with "
            f"`evomerge resume {study} --force-unlock`")


def force_unlock(store: Store, study: str) -> str | None:
    """Free the study's lease from whoever holds it now (the user checked that it is gone); returns
    that holder. Only that holder's lease is freed: a run that took the lease since keeps it."""
    holder = store.get_study(study).lease_owner
    if holder is not None:
        store.release_lease(study, holder)
    return holder


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
        except StudyLocked as e:
            holder = self.store.get_study(self.study).lease_owner
            if not owner_is_dead_here(holder):
                raise StudyLocked(self.study, e.owner, e.expires, refusal(self.study, e.owner, e.expires)) from None
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
