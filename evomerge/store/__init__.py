"""SQL store of evomerge: studies, candidates, scores, per-example scores, checkpoints, leases, events.

SQLAlchemy 2 ORM models (``models``), Alembic migrations shipped in ``migrations/`` (the single
source of truth for the schema, applied automatically on open), and the ``Store`` facade used by
the driver, the CLI and the study view. The store's modules, lowest first:

- ``errors``: the exceptions;
- ``values``: checks and conversions of what callers hand in (JSON data, scores, timestamps);
- ``rows``: the frozen rows handed back (``StudyRow``, ``CandidateRow``, ``CheckpointRow``);
- ``engine``: storage URLs and ``Database``, the one engine, session factory and schema check;
- ``studies``, ``leases``, ``candidates``, ``checkpoints``, ``series``, ``events``: the methods of each
  concept (``series``: the hypervolume series and the light table of a study that the dashboard reads;
  ``events``: the run's news kept for ``status`` and the dashboard, such as a node lost);
- ``store``: ``Store``, the one public class, made of those methods over a ``Database``.
"""

from .engine import MIGRATIONS_DIR, default_storage_url
from .errors import (
    CandidateNotFound,
    NoDatabaseFile,
    StorageOpenError,
    StoreError,
    StoreReadOnly,
    StudyExists,
    StudyLocked,
    StudyNotFound,
)
from .events import EventRow
from .rows import CandidateRow, CheckpointRow, StudyRow
from .store import Store
from .studies import CANDIDATE_STATES, STUDY_STATUSES

__all__ = [
    "CANDIDATE_STATES",
    "MIGRATIONS_DIR",
    "STUDY_STATUSES",
    "CandidateNotFound",
    "CandidateRow",
    "CheckpointRow",
    "EventRow",
    "NoDatabaseFile",
    "StorageOpenError",
    "Store",
    "StoreError",
    "StoreReadOnly",
    "StudyExists",
    "StudyLocked",
    "StudyNotFound",
    "StudyRow",
    "default_storage_url",
]
