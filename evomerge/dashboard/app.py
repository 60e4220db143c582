"""The dashboard's web application: four pages, their assets and a JSON API, all GET, over a read-only store.

The pages are static HTML and JavaScript shipped in ``static/``, with a plotly.js of only the trace types
they draw (built by ``plotly-bundle/``): they fetch the JSON API and put what the store holds into the
document as text, never as markup, so a study named ``<script>...`` is shown, not run. A
Content-Security-Policy allowing scripts from this server only is the second fence. Assets are served
by Starlette's ``StaticFiles``, which refuses any path that leaves its folder.

Every study answer is cached against the study's stamp (its status, counts per state and newest
start or finish, two aggregate queries): a page polling once a second costs two small queries until
something changes, and the first request after a change rebuilds the answer.
"""

from __future__ import annotations

import gc
import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from evomerge.dashboard import data
from evomerge.store import CandidateNotFound, Store, StudyNotFound
from evomerge.view import StudyView

STATIC = Path(__file__).resolve().parent / "static"
PAGES = {"/": "studies.html", "/study": "study.html", "/candidate": "candidate.html",
         "/compare": "compare.html", "/api": "api.html"}
POLL_MS = 1000  # how often an open page asks whether its study changed: a new result shows within ~1 s

# 'unsafe-eval': plotly's WebGL trace (scattergl, the Pareto plot of a large study) compiles its shaders'
# glue code with new Function; inline scripts, the way markup from the store could run, stay refused.
CSP = ("default-src 'self'; script-src 'self' 'unsafe-eval'; style-src 'self' 'unsafe-inline'; "
       "img-src 'self' data: blob:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
       "frame-ancestors 'none'; form-action 'none'")


class _Json(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return content if isinstance(content, bytes) else _dumps(content)


def _dumps(payload: Any) -> bytes:
    return json.dumps(payload, separators=(",", ":"), allow_nan=False, default=str).encode()


@contextmanager
def _no_gc() -> Iterator[None]:
    """The garbage collector held off while an answer is built: a study's answer allocates hundreds of
    thousands of objects, none in a cycle, and the collections they set off took 40% of the points
    call's time. It runs again after, if it ran before (another thread may be building too)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


class _Cache:
    """Answers per (what, study, args), kept while the study's stamp stays the same."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: dict[tuple, tuple[bytes, bytes]] = {}

    def get(self, key: tuple, stamp: bytes, build: Callable[[], Any]) -> bytes:
        with self._lock:
            hit = self._items.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        with _no_gc():
            body = _dumps(build())
        with self._lock:
            self._items[key] = (stamp, body)
        return body


def create_app(store: Store, storage_arg: str = "") -> FastAPI:
    """The dashboard over ``store`` (open it read-only); ``storage_arg`` is what the export command
    shown on candidate pages passes as ``--storage`` (empty: the default database)."""
    view = StudyView(store)
    cache = _Cache()
    app = FastAPI(
        title="evomerge dashboard",
        description="Read-only JSON API over an evomerge study database: studies, candidates, fronts, "
                    "the hypervolume series, the run's events. Every route is GET; nothing writes to the store.",
        version="1",
        docs_url=None, redoc_url=None,  # their pages load scripts from a CDN: /api draws the schema itself
        openapi_url="/api/openapi.json",
    )

    @app.exception_handler(StudyNotFound)
    def _no_study(_req: Request, e: StudyNotFound) -> JSONResponse:
        return JSONResponse({"detail": str(e)}, status_code=404)

    @app.exception_handler(CandidateNotFound)
    def _no_candidate(_req: Request, e: CandidateNotFound) -> JSONResponse:
        return JSONResponse({"detail": str(e)}, status_code=404)

    @app.middleware("http")
    async def _headers(request: Request, call_next: Callable) -> Response:
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        # pages and assets are revalidated (a 304 while their ETag holds), so an upgraded evomerge's
        # scripts are used at once, not after a browser's heuristic freshness runs out
        response.headers["Cache-Control"] = "no-store" if request.url.path.startswith("/api/") else "no-cache"
        return response

    def _page(file: str) -> Callable[[], FileResponse]:
        def page() -> FileResponse:
            return FileResponse(STATIC / file, media_type="text/html")
        return page

    for route, file in PAGES.items():
        app.add_api_route(route, _page(file), methods=["GET"], include_in_schema=False)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    def _stamp(study: str) -> bytes:
        return _dumps(data.stamp(view, study))

    @app.get("/api/studies", response_class=_Json, summary="Every study with its progress and best values")
    def api_studies() -> Any:
        rows = []
        for r in view.studies():
            key = _dumps([r[k] for k in ("state", "queued", "running", "complete", "failed", "updated")])
            raw = view.stamp(r["study"])  # read once: the cache's key and the row's last activity
            stamp = key + _dumps(data.stamp_json(raw))
            rows.append(cache.get(("row", r["study"]), stamp, lambda r=r, raw=raw: data.study_row(view, r, raw)))
        return _Json(b"[" + b",".join(rows) + b"]")

    @app.get("/api/study", response_class=_Json, summary="One study: state, counts, objectives, reference point")
    def api_study(study: str = Query(..., description="study name")) -> Any:
        return _Json(cache.get(("study", study), _stamp(study), lambda: data.study(view, study)))

    @app.get("/api/points", response_class=_Json,
             summary="Every candidate of a study, column by column, with scores and front membership")
    def api_points(study: str = Query(..., description="study name")) -> Any:
        return _Json(cache.get(("points", study), _stamp(study), lambda: data.points(view, study)))

    @app.get("/api/hypervolume", response_class=_Json,
             summary="The stored hypervolume series (over evaluations and seconds since the study began)")
    def api_hypervolume(study: str = Query(..., description="study name")) -> Any:
        return _Json(cache.get(("hv", study), _stamp(study), lambda: data.hypervolume(view, study)))

    @app.get("/api/algorithm", response_class=_Json,
             summary="Algorithm internals: M2N2's archive, MAP's surrogate predictions against results")
    def api_algorithm(study: str = Query(..., description="study name")) -> Any:
        return _Json(cache.get(("algo", study), _stamp(study), lambda: data.algorithm_state(view, study)))

    @app.get("/api/events", response_class=_Json,
             summary="The study's run events, oldest first: Ray nodes lost, workers back to full strength")
    def api_events(study: str = Query(..., description="study name"),
                   limit: int = Query(50, ge=1, le=1000, description="the newest this many")) -> Any:
        # not cached: one indexed query of a few rows, and an event need not change the study's stamp
        return _Json(data.events(view, study, limit))

    @app.get("/api/stamp", response_class=_Json,
             summary="What changes when the study changes (poll it, then fetch what you show)")
    def api_stamp(study: str = Query(..., description="study name")) -> Any:
        return _Json(_stamp(study))

    @app.get("/api/candidate", response_class=_Json,
             summary="One candidate: scores, per-example summary against its parents, recipe, lineage")
    def api_candidate(study: str = Query(..., description="study name"),
                      number: int = Query(..., ge=1, description="candidate number")) -> Any:
        return _Json(cache.get(("cand", study, number), _stamp(study),
                         lambda: data.candidate(view, study, number, storage_arg)))

    @app.get("/api/config", response_class=_Json, include_in_schema=False)
    def api_config() -> Any:
        return _Json({"poll_ms": POLL_MS, "storage": store.url_display, "read_only": store.read_only})

    return app
