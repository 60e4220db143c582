"""Held-out report scoring: the final front scored on the space's report objectives, over the same pool.

Report objectives never steer the search; they are scored once the search is finished, for the front's
members only. A failed evaluation or a dead worker costs that candidate its report score (with a line
saying so), never the run: the search's results are already stored.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from evomerge.run.pool import PoolError, Task, WorkerPool, slot_label
from evomerge.store import CandidateRow, Store
from evomerge.view import StudyView

if TYPE_CHECKING:
    from evomerge.space import SearchSpace


def report_todo(store: Store, study: str, space: SearchSpace) -> list[CandidateRow]:
    """Front members not yet scored on every report objective."""
    names = {o.name for o in space.report}
    if not names:
        return []
    return [c for c in StudyView(store).front(study) if not names <= set(c.scores)]


def score_report(store: Store, study: str, space: SearchSpace, pool: WorkerPool,
                 log: Callable[[str], None]) -> int:
    """Score ``report_todo`` on the pool; returns how many candidates got their report scores."""
    names = [o.name for o in space.report]
    todo = report_todo(store, study, space)
    if not todo:
        return 0
    log(f"scoring the front's {len(todo)} candidates on held-out {', '.join(names)}")
    tries = {c.number: 0 for c in todo}
    queue = [Task(c.number, c.recipe_json, names) for c in todo]
    scored = 0
    try:
        while queue or pool.in_flight:
            while queue and pool.idle:
                task = queue.pop()
                tries[task.number] += 1
                pool.submit(task)
            for o in pool.wait(None):
                if o.died is not None:
                    n, most = o.task.number, space.evaluation.max_attempts
                    who = slot_label(o.worker)
                    if tries[n] < most:
                        queue.append(o.task)
                        log(f"{who} died ({o.died}) while scoring #{n} on held-out {', '.join(names)}; "
                            f"retrying, attempt {tries[n] + 1}/{most}")
                    else:
                        log(f"{who} died ({o.died}) while scoring #{n} on held-out {', '.join(names)}; "
                            f"no report score after {tries[n]}/{most} attempts")
                    continue
                res = o.result or {}
                if res.get("error"):
                    log(f"candidate {o.task.number}: held-out scoring failed: {res['error'].splitlines()[0]}")
                    continue
                store.add_scores(study, o.task.number, res["scores"], res["samples"])
                scored += 1
    except PoolError as e:
        log(f"held-out scoring stopped: {e}")
    return scored
