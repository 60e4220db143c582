"""The web dashboard: ``evomerge dashboard`` serves pages and a JSON API over a study database, read-only.

``create_app(store)`` builds the FastAPI application (``app``); ``serve`` opens the store read-only
and runs it under uvicorn. The data each page shows is computed in ``data`` from a ``StudyView``.
"""

from __future__ import annotations

import threading

from evomerge.dashboard import data
from evomerge.dashboard.app import create_app
from evomerge.store import Store

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def serve(url: str, host: str = "127.0.0.1", port: int = 8000, storage_arg: str = "",
          say=print) -> None:
    """Serve the dashboard of the database at ``url`` until Ctrl-C. The store is opened read-only:
    SQLite in ``mode=ro``, PostgreSQL in read-only transactions (a role with SELECT is enough)."""
    import uvicorn  # the server: only when the dashboard runs

    store = Store(url, read_only=True)
    try:
        # the export command on candidate pages repeats --storage, with any password masked
        app = create_app(store, store.url_display if storage_arg else "")
        # the genome kinds and the mergekit translation take seconds to import: not on the first
        # candidate page a user opens
        threading.Thread(target=data.warm_up, daemon=True).start()
        shown = f"[{host}]" if ":" in host else host
        say(f"dashboard of {store.url_display} (read-only) on http://{shown}:{port}/")
        if host not in LOCAL_HOSTS:
            say(f"warning: listening on {host}, not 127.0.0.1: anyone who can reach this port can read "
                "every study (there is no login); use --host 127.0.0.1 and an SSH tunnel to share it")
        else:
            say("listening on this machine only (127.0.0.1); --host 0.0.0.0 would open it to the network")
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
    finally:
        store.close()


__all__ = ["LOCAL_HOSTS", "create_app", "serve"]
