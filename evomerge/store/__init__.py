"""SQL store of evomerge: studies, candidates, scores, per-example scores, checkpoints, leases.

SQLAlchemy 2 ORM models (``models``), Alembic migrations shipped in ``migrations/`` (the single
source of truth for the schema, applied automatically on open or by ``Store.upgrade()``), and the
``Store`` repository used by the driver, the CLI and the dashboard.
"""

from .errors import CandidateNotFound, StorageOpenError, StoreError, StudyExists, StudyLocked, StudyNotFound
from .store import (
    CANDIDATE_STATES,
    MIGRATIONS_DIR,
    STUDY_STATUSES,
    CandidateRow,
    CheckpointRow,
    Store,
    StudyRow,
    default_storage_url,
)

__all__ = [
    "CANDIDATE_STATES",
    "MIGRATIONS_DIR",
    "STUDY_STATUSES",
    "CandidateNotFound",
    "CandidateRow",
    "CheckpointRow",
    "StorageOpenError",
    "Store",
    "StoreError",
    "StudyExists",
    "StudyLocked",
    "StudyNotFound",
    "StudyRow",
    "default_storage_url",
]
