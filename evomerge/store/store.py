"""The evomerge store: studies, candidates, scores, checkpoints, leases and events in one SQL database.

One driver process writes (workers return results to the driver); the CLI, the study view and the
dashboard read, and may open the store with ``read_only=True``. Every public method is one short
transaction of its own, unless called inside ``with store.batch():``, which makes the block's calls one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy.engine import URL

from .candidates import CandidateMethods
from .checkpoints import CheckpointMethods
from .engine import Database, default_storage_url
from .events import EventMethods
from .leases import LeaseMethods
from .series import SeriesMethods
from .studies import StudyMethods


class Store(StudyMethods, LeaseMethods, CandidateMethods, CheckpointMethods, SeriesMethods, EventMethods):
    """Repository over one storage URL (``sqlite:///...`` or ``postgresql+psycopg://...``).

    Opening a store brings the schema to the newest revision through the Alembic migrations shipped
    in ``evomerge/store/migrations`` (``auto_upgrade=False`` refuses an old schema instead). A schema
    newer than this evomerge is always refused.

    ``read_only=True`` opens an existing database for reading only: nothing is created or upgraded
    (a missing SQLite file or an old schema is refused on opening), and every write raises
    ``StoreReadOnly``.
    """

    def __init__(
        self,
        url: str | URL | None = None,
        *,
        read_only: bool = False,
        auto_upgrade: bool = True,
        echo: bool = False,
    ) -> None:
        self.db = Database(
            default_storage_url() if url is None else url,
            read_only=read_only,
            auto_upgrade=auto_upgrade,
            echo=echo,
        )

    @contextmanager
    def batch(self) -> Iterator[None]:
        """The store calls of this thread inside the block as one transaction (see ``Database.batch``)."""
        with self.db.batch():
            yield

    @property
    def url(self) -> URL:
        return self.db.url

    @property
    def url_display(self) -> str:
        """The URL with its password masked, for messages."""
        return self.db.url_display

    @property
    def read_only(self) -> bool:
        return self.db.read_only

    @property
    def revision_at_open(self) -> str | None:
        """The schema revision found on opening, before any automatic upgrade (None: empty)."""
        return self.db.revision_at_open

    def current_revision(self) -> str | None:
        """The schema revision the database holds now."""
        return self.db.current_revision()

    def __repr__(self) -> str:
        mode = ", read_only=True" if self.read_only else ""
        return f"Store({self.url_display!r}{mode})"

    def close(self) -> None:
        self.db.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
