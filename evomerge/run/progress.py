"""Live progress of a search on the terminal: candidates done, best per objective, hypervolume, ETA.

It reads the study through a ``StudyView`` only, so it shows what the store holds (what `status` and
the dashboard show) and cannot change it.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from evomerge.view import StudySummary, StudyView


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


class SearchProgress:
    def __init__(self, view: StudyView, study: str, budget: int, console: Console | None = None,
                 enabled: bool = True) -> None:
        self.view = view
        self.study = study
        self.enabled = enabled
        self.progress = Progress(
            TextColumn("[bold]{task.fields[study]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[summary]}"),
            TimeRemainingColumn(),
            console=console,
            disable=not enabled,
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
        self.progress.update(self.task, completed=s.done, summary=summary_text(s))
