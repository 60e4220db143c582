"""The tables `evomerge status` and `evomerge front` print, built from a ``StudyView``.

The front reads at 100 columns: the space's objectives in its order (search, then held out), each
column as integers when all its values are, one row per distinct set of scores (the others counted),
the recipe cell cut to the width left with a legend under the table (``wide`` gives the whole recipe
and its hash), and the command that exports the best row.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import yaml
from rich import box
from rich.console import Console
from rich.table import Table

from evomerge.store import CandidateRow, StudyRow
from evomerge.view import StudyView


def format_column(values: Sequence[float | None]) -> list[str]:
    """One column of scores: integers when every finite value is one and some exceeds 1 (costs, counts:
    an accuracy column of zeros and ones stays in decimals), else 4 decimals."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    integral = (any(abs(v) > 1 for v in finite)
                and all(float(v).is_integer() and abs(v) < 1e15 for v in finite))
    out = []
    for v in values:
        if v is None:
            out.append("-")
        elif not math.isfinite(v):
            out.append(str(v))
        else:
            out.append(f"{int(v):d}" if integral else f"{v:.4f}")
    return out


def report_names(st: StudyRow) -> list[str]:
    """The held-out (report) objectives in the space's order, read from the stored space."""
    try:
        data = yaml.safe_load(st.space_yaml) or {}
    except yaml.YAMLError:
        return []
    report = data.get("report") if isinstance(data, dict) else None
    return [r["name"] for r in report or [] if isinstance(r, dict) and "name" in r]


def duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    if h:
        return f"{h}h{m:02d}m"
    return f"{m}m{s:02d}s" if m else f"{s}s"


def elapsed_s(row: dict[str, Any], now: datetime | None = None) -> float | None:
    """Seconds from a study's creation to its last change (to now while it runs)."""
    created, updated = row.get("created"), row.get("updated")
    if created is None:
        return None
    end = (now or datetime.now(UTC)) if row.get("state") == "running" else updated or created
    return (end - created).total_seconds()


# ------------------------------------------------------------------------------------------- status

def status_rows(view: StudyView) -> list[dict[str, Any]]:
    """``StudyView.studies()`` with each study's best value per objective and its elapsed seconds."""
    rows = view.studies()
    for r in rows:
        r["best"] = view.best(r["study"]) if r.get("complete") else {}
        r["elapsed_s"] = elapsed_s(r)
        r["events"] = view.events(r["study"], limit=STATUS_EVENTS)
    return rows


STATUS_EVENTS = 20  # the newest events of each study that `status` reads (and `status --json` lists)
_EVENT_TEXT = 64  # a message's first clauses up to this many characters: what happened, not the advice after


def cluster_news(events: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The events that still matter: the latest node losses (those since the workers were last all
    running) and the workers' return after them if it came; nothing when no node was lost."""
    lost = [i for i, e in enumerate(events) if e["kind"] == "node_lost"]
    if not lost:
        return []
    first = lost[-1]
    while first > 0 and events[first - 1]["kind"] != "workers_back":
        first -= 1
    out = [e for e in events[first:lost[-1] + 1] if e["kind"] == "node_lost"]
    back = next((e for e in events[lost[-1] + 1:] if e["kind"] == "workers_back"), None)
    return out + ([back] if back is not None else [])


def _event_text(message: str) -> str:
    clauses = message.split("; ")
    text = clauses[0]
    for c in clauses[1:]:
        if len(text) + 2 + len(c) > _EVENT_TEXT:
            break
        text += "; " + c
    return text


def status_events(rows: list[dict[str, Any]], width: int = 100) -> list[str]:
    """One line per event that matters (``cluster_news``) of each study, at most ``width`` characters:
    study, local time, what happened."""
    news = [(r["study"], e) for r in rows for e in cluster_news(r.get("events", []))]
    pad = max((len(name) for name, _ in news), default=0)
    out = []
    for name, e in news:
        line = f"{name:<{pad}}  {e['time'].astimezone():%Y-%m-%d %H:%M}  {_event_text(e['message'])}"
        out.append(line if len(line) <= width else line[:width - 1] + "…")
    return out


def status_table(rows: list[dict[str, Any]]) -> Table:
    t = Table("study", "state", "done", "failed", "running", "best", "elapsed", box=box.SIMPLE_HEAD, show_edge=False)
    for r in rows:
        done = r["complete"] + r["failed"]
        best = ", ".join(f"{k} {_num(v)}" for k, v in r["best"].items()) or "-"
        busy = r["running"] + r["queued"]
        t.add_row(r["study"], r["state"], f"{done}/{r['budget']}", str(r["failed"]), str(busy), best,
                  duration(r["elapsed_s"]) if r["elapsed_s"] is not None else "-")
    return t


def _num(v: float) -> str:
    return f"{int(v)}" if float(v).is_integer() and abs(v) < 1e15 else f"{v:.4g}"


# -------------------------------------------------------------------------------------------- front

@dataclass
class FrontRow:
    candidate: CandidateRow
    same: list[int] = field(default_factory=list)  # other candidates with exactly these scores


@dataclass
class Front:
    study: str
    search: list[dict[str, str]]  # name, direction
    held_out: list[str]
    rows: list[FrontRow]
    complete: int
    budget: int | None
    names: dict[str, str]  # stored model reference -> as the user wrote it

    @property
    def collapsed(self) -> int:
        return sum(len(r.same) for r in self.rows)


def load_front(view: StudyView, study: str) -> Front:
    """The study's front, best first on the first objective, candidates with identical scores merged."""
    from evomerge.space import space_origin  # pydantic and the kind registries: the front only, not status

    st = view.study(study)
    search = list(st.objectives)
    names = [o["name"] for o in search]
    held = [n for n in report_names(st) if n not in names]
    cands = view.front(study)
    extra = sorted({k for c in cands for k in c.scores} - set(names) - set(held))
    held += extra  # scores of objectives a later space dropped: still shown, after the space's own
    sign = {o["name"]: -1.0 if o["direction"] == "maximize" else 1.0 for o in search}
    cands = sorted(cands, key=lambda c: ([sign[n] * c.scores[n] for n in names], c.number))
    rows: list[FrontRow] = []
    seen: dict[tuple, FrontRow] = {}
    for c in cands:
        key = tuple(c.scores.get(n) for n in names + held)
        if key in seen:
            seen[key].same.append(c.number)
            continue
        seen[key] = FrontRow(c)
        rows.append(seen[key])
    return Front(study, search, held, rows, view.counts(study)["complete"], st.budget,
                 space_origin(st.space_yaml).get("names", {}))


def front_json(front: Front) -> list[dict[str, Any]]:
    """Every front member (duplicates included), as `front --json` prints it."""
    out = []
    for r in front.rows:
        for number, c in [(r.candidate.number, r.candidate), *((n, None) for n in r.same)]:
            out.append({"candidate": number, "scores": r.candidate.scores, "recipe_hash": r.candidate.recipe_hash,
                        "recipe": json.loads(r.candidate.recipe_json), **({"same_scores_as": r.candidate.number}
                                                                          if c is None else {})})
    return out


def print_front(front: Front, console: Console, *, wide: bool = False, storage: str | None = None) -> None:
    """The table, its legend and the next step, on ``console``."""
    # the genome kinds (pydantic, the operator registry): the front only, not status
    from evomerge.genomes import recipe_from_json, recipe_legend, recipe_summary

    n = len(front.rows) + front.collapsed
    title = (f"Pareto front of {front.study}: {n} candidate{'s' if n != 1 else ''} "
             f"({front.complete} complete of budget {front.budget})")
    t = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, title_justify="left")
    t.add_column("#", justify="right", no_wrap=True)
    for o in front.search:
        t.add_column(o["name"], justify="right", no_wrap=True)
    for name in front.held_out:
        t.add_column(f"{name}*", justify="right", no_wrap=True)
    cols = [o["name"] for o in front.search] + front.held_out
    cells = {k: format_column([r.candidate.scores.get(k) for r in front.rows]) for k in cols}
    recipes = [recipe_from_json(r.candidate.recipe_json) for r in front.rows]
    numbers = [f"{r.candidate.number}" + (f" +{len(r.same)}" if r.same else "") for r in front.rows]
    if wide:
        t.add_column("recipe", overflow="fold")
        t.add_column("recipe hash", no_wrap=True)
    else:
        # the score columns keep their full width; the recipe gets what is left, cut with an ellipsis
        used = max([1, *map(len, numbers)]) + sum(max([len(c) + 1, *map(len, cells[c])]) for c in cols)
        left = console.width - used - 3 * (len(cols) + 1) - 1  # 3: the padding and rule between columns
        t.add_column("recipe", no_wrap=True, overflow="ellipsis", max_width=max(12, left))
    for i, (number, recipe) in enumerate(zip(numbers, recipes, strict=True)):
        row = [number, *(cells[k][i] for k in cols), recipe_summary(recipe)]
        t.add_row(*row, *([front.rows[i].candidate.recipe_hash] if wide else []))
    console.print(t)
    arrows = ", ".join(f"{o['name']} ({'higher' if o['direction'] == 'maximize' else 'lower'} is better)"
                       for o in front.search)
    notes = [f"search objectives: {arrows}"]
    if front.held_out:
        notes.append("* held out: scored on the final front only, never used to steer the search")
    if front.collapsed:
        same = "; ".join(f"{r.candidate.number}: {', '.join(map(str, r.same))}" for r in front.rows if r.same)
        notes.append(f"+N: N more candidates with exactly the same scores, shown once ({same})")
    if recipes:
        legend = recipe_legend(recipes[0])
        if legend:
            notes.append(legend)
        notes.append("sources: " + _sources_line(recipes[0], front.names))
        if not wide:
            notes.append("--wide: the whole recipe and its hash; --json: everything")
    for line in notes:
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    if front.rows:
        where = f" --storage {storage}" if storage else ""
        console.print(f"next: evomerge export {front.study} --candidate {front.rows[0].candidate.number} "
                      f"--out DIR{where}", markup=False, highlight=False)


def _sources_line(recipe: Any, names: dict[str, str]) -> str:
    sources = getattr(recipe, "sources", None) or getattr(recipe, "models", [])
    parts = [f"{i} {names.get(s, s)}" for i, s in enumerate(sources)]
    base = getattr(recipe, "base", None)
    if base:
        parts.append(f"base {names.get(base, base)}")
    return ", ".join(parts)
