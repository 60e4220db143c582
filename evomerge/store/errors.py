"""Exceptions raised by the evomerge store."""

from __future__ import annotations

from datetime import datetime


class StoreError(RuntimeError):
    """A storage problem that is not a bad argument (schema too new, database unreachable...)."""


class StorageOpenError(StoreError, ValueError):
    """The storage cannot be used: unreachable, or its schema is too old (without auto-upgrade) or
    newer than this evomerge. A ValueError, like a bad URL, so front ends report it as one line."""


class NoDatabaseFile(StorageOpenError):
    """A SQLite database opened read-only that does not exist (yet): nothing to read, nothing created."""

    def __init__(self, message: str, path: str) -> None:
        super().__init__(message)
        self.path = path


class StudyNotFound(StoreError, LookupError):
    def __init__(self, name: str) -> None:
        super().__init__(f"no study named {name!r} in this storage")
        self.name = name


class StudyExists(StoreError, ValueError):
    def __init__(self, name: str) -> None:
        super().__init__(f"a study named {name!r} already exists; choose another name or resume it")
        self.name = name


class CandidateNotFound(StoreError, LookupError):
    def __init__(self, study: str, number: int) -> None:
        super().__init__(f"study {study!r} has no candidate {number}")
        self.study = study
        self.number = number


class StudyLocked(StoreError):
    """Another driver holds the study's lease (or this driver lost it)."""

    def __init__(self, study: str, owner: str | None, expires: datetime | None, message: str | None = None):
        if message is None:
            until = expires.strftime("%Y-%m-%d %H:%M:%S UTC") if expires is not None else "an unknown time"
            message = f"study {study} is being searched by {owner} until {until}"
        super().__init__(message)
        self.study = study
        self.owner = owner
        self.expires = expires


class StoreReadOnly(StoreError):
    """A write through a store opened with ``read_only=True``."""
