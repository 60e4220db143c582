"""Live progress of a search on the terminal: candidates done, best per objective, hypervolume, ETA."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from evomerge import front as frontlib

if TYPE_CHECKING:
    from evomerge.driver import Driver


class SearchProgress:
    def __init__(self, driver: Driver, enabled: bool = True):
        self.driver = driver
        self.enabled = enabled
        self.progress = Progress(
            TextColumn("[bold]{task.fields[study]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[summary]}"),
            TimeRemainingColumn(),
            console=driver.console,
            disable=not enabled,
            transient=False,
        )
        self.task = None

    def __enter__(self) -> SearchProgress:
        self.progress.__enter__()
        self.task = self.progress.add_task(
            "search", total=self.driver.space.budget, study=self.driver.study, summary=""
        )
        self.update()
        return self

    def __exit__(self, *exc) -> None:
        self.update()
        self.progress.__exit__(*exc)

    def summary(self) -> tuple[int, str]:
        d = self.driver
        counts = d.store.study_counts(d.study)
        done = counts["complete"] + counts["failed"]
        F = d.front_values()
        if len(F) == 0:
            return done, f"failed {counts['failed']}"
        parts = []
        for j, (name, direction) in enumerate(zip(d.names, d.directions, strict=True)):
            best = F[:, j].max() if direction == "maximize" else F[:, j].min()
            parts.append(f"{name} {best:.3g}")
        Fm = frontlib.to_minimization(F, d.directions)
        ref = d.reference_point(Fm)
        hv = frontlib.hypervolume(Fm, ref) if len(d.names) > 1 else float(np.nan)
        text = "best " + ", ".join(parts)
        if np.isfinite(hv):
            text += f" | HV {hv:.4g}"
        if counts["failed"]:
            text += f" | failed {counts['failed']}"
        return done, text

    def update(self) -> None:
        if not self.enabled or self.task is None:
            return
        done, text = self.summary()
        self.progress.update(self.task, completed=done, summary=text)
