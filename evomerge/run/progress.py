"""What a run tells its user while it works: events (waits, start-ups, deaths) and the search's progress.

Three forms (``--log-format``): ``rich`` on a terminal, a live bar (candidates done, best per objective,
hypervolume, time left) with each event printed above it; ``plain``, one timestamped line per event and
one per finished candidate, never cut to a width (a cluster job's log, a file, a pipe); ``json``, the
same events as one JSON object per line. ``auto`` is ``rich`` on a terminal and ``plain`` otherwise.

Progress reads the study through a ``StudyView`` only, so it shows what the store holds (what `status`
and the dashboard show) and cannot change it.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import UTC, datetime
from typing import Any, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from evomerge.view import StudySummary, StudyView

LOG_FORMATS = ("auto", "rich", "plain", "json")


def resolve_log_format(fmt: str, stream: TextIO | None = None) -> str:
    """``auto`` becomes ``rich`` when ``stream`` (stderr) is a terminal, ``plain`` otherwise."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"--log-format must be one of {', '.join(LOG_FORMATS)}, not {fmt!r}")
    if fmt != "auto":
        return fmt
    stream = stream if stream is not None else sys.stderr
    return "rich" if stream.isatty() else "plain"


class EventLog:
    """One place a run's events go, in one of the forms above (``fmt`` already resolved)."""

    def __init__(self, fmt: str = "rich", console: Console | None = None, stream: TextIO | None = None) -> None:
        self.fmt = fmt
        self.console = console or Console(stderr=True)
        self.stream = stream

    def event(self, kind: str, message: str, **fields: Any) -> None:
        """``kind``: what it is about (zoo, ray, worker, progress, run, report); ``fields``: its figures."""
        if self.fmt == "rich":
            self.console.print(message, markup=False, highlight=False, soft_wrap=True)  # one event, one line
            return
        now = datetime.now(UTC)
        if self.fmt == "json":
            line = json.dumps({"time": now.isoformat(timespec="seconds"), "event": kind, "message": message,
                               **fields}, default=str)
        else:
            line = f"{now:%Y-%m-%d %H:%M:%S} {kind}: {message}"
        out = self.stream if self.stream is not None else sys.stderr
        print(line, file=out, flush=True)

    def say(self, message: str) -> None:
        """An event of the run itself (for callers that only have a line to give)."""
        self.event("run", message)


def summary_text(s: StudySummary) -> str:
    """"best a 0.5, b 0.25 | HV 0.12 | failed 1", or "failed N" before any result."""
    failed = s.counts["failed"]
    if not s.best:
        return f"failed {failed}"
    text = "best " + ", ".join(f"{o.name} {s.best[o.name]:.3g}" for o in s.objectives)
    if s.hypervolume is not None:
        text += f" | HV {s.hypervolume:.4g}"
    if failed:
        text += f" | failed {failed}"
    return text


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class SearchProgress:
    """The search's progress: a live bar (``rich``) or one event per finished candidate (``plain``/``json``)."""

    def __init__(self, view: StudyView, study: str, budget: int, console: Console | None = None,
                 enabled: bool = True, log: EventLog | None = None) -> None:
        self.view = view
        self.study = study
        self.budget = budget
        self.enabled = enabled
        self.log = log
        self.live = enabled and (log is None or log.fmt == "rich")
        self._last_done: int | None = None
        self._t0 = time.monotonic()
        self._done0: int | None = None
        self.progress = Progress(
            TextColumn("[bold]{task.fields[study]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[summary]}"),
            TimeRemainingColumn(),
            console=console if log is None else log.console,
            disable=not self.live,
            transient=False,
        )
        self.task = self.progress.add_task("search", total=budget, study=study, summary="")

    def __enter__(self) -> SearchProgress:
        self.progress.__enter__()
        self.update()
        return self

    def __exit__(self, *exc: object) -> None:
        self.update()
        self.progress.__exit__(*exc)

    def update(self) -> None:
        if not self.enabled:
            return  # an update reads the store: not when nobody looks
        s = self.view.summary(self.study)
        if self.live:
            self.progress.update(self.task, completed=s.done, summary=summary_text(s))
            return
        if s.done == self._last_done or self.log is None:
            return
        if self._last_done is not None and self._done0 is None:
            # the rate counts from the first result of this run: worker start-up is not per candidate
            self._done0, self._t0 = s.done, time.monotonic()
        self._last_done = s.done
        msg = f"{s.done}/{self.budget} done | {summary_text(s)}"
        new = s.done - self._done0 if self._done0 is not None else 0
        if 0 < new and s.done < self.budget:
            left = (time.monotonic() - self._t0) / new * (self.budget - s.done)
            msg += f" | about {_duration(left)} left"
        self.log.event("progress", msg, done=s.done, budget=self.budget, counts=s.counts, best=s.best,
                       hypervolume=s.hypervolume)
