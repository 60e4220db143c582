"""What the dashboard's JSON API answers, built from a read-only ``StudyView``.

Plain functions from a view (and a study name) to JSON-able dicts; the web layer (``app``) only routes
and caches. Times go out as ISO strings and, where plotted, as seconds since the study started.
Everything from the store goes out as data, never as markup: the pages put it in the document as text.
"""

from __future__ import annotations

import functools
import json
import math
import shlex
from datetime import datetime
from typing import Any

import numpy as np
import yaml

from evomerge.store.series import TABLE_COLUMNS
from evomerge.view import StudyView, effective_state

COL = {c: i for i, c in enumerate(TABLE_COLUMNS)}


def iso(t: datetime | None) -> str | None:
    return t.isoformat() if t is not None else None


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


@functools.lru_cache(maxsize=256)  # a study's space never changes, and YAML is slow to parse
def space_meta(space_yaml: str) -> dict[str, Any]:
    """Algorithm, genome kind and report objectives read from the stored space, without validating it
    (a study of an older evomerge still shows)."""
    try:
        sp = yaml.safe_load(space_yaml) or {}
    except yaml.YAMLError:
        sp = {}
    if not isinstance(sp, dict):
        sp = {}
    algo = sp.get("algorithm") or {}
    genome = sp.get("genome") or {}
    report = sp.get("report") or []
    return {
        "algorithm": (algo.get("name") if isinstance(algo, dict) else None) or "?",
        "genome": (genome.get("type") if isinstance(genome, dict) else None) or "parameter_space",
        "report": [r.get("name") for r in report if isinstance(r, dict) and r.get("name")],
    }


def _dominated_by(A: np.ndarray, G: np.ndarray) -> np.ndarray:
    """For each row of G: does some row of A dominate it (<= everywhere, not equal)?"""
    if not len(A) or not len(G):
        return np.zeros(len(G), dtype=bool)
    # one (len A, len G) comparison per objective: reducing a third axis of 2 or 3 objectives was most
    # of the time
    le = np.ones((len(A), len(G)), dtype=bool)
    eq = np.ones((len(A), len(G)), dtype=bool)
    for j in range(A.shape[1]):
        a, g = A[:, j, None], G[None, :, j]
        le &= a <= g
        eq &= a == g
    return (le & ~eq).any(axis=0)


def front_mask(F_min: np.ndarray, block: int = 128, elite: int = 48) -> np.ndarray:
    """Non-dominated rows of a finite minimisation matrix (what ``front.non_dominated`` answers, in
    milliseconds for 10,000 rows). First the rows that one of a few good rows (best sums of ranks)
    dominates are dropped at once, most of a large study; then, after a lexicographic sort, a row can
    only be dominated by rows before it, and then by one on the front of those: blocks of sorted rows
    are checked against the front so far and among themselves, and their survivors join it."""
    n, m = F_min.shape
    mask = np.zeros(n, dtype=bool)
    if n == 0:
        return mask
    ranks = np.argsort(np.argsort(F_min, axis=0), axis=0).sum(axis=1)
    good = F_min[np.argpartition(ranks, elite)[:elite]] if n > elite else F_min
    alive = np.flatnonzero(~_dominated_by(good, F_min))
    order = alive[np.lexsort(tuple(F_min[alive, j] for j in reversed(range(m))))]
    front = np.empty((0, m))
    for s in range(0, len(order), block):
        idx = order[s: s + block]
        G = F_min[idx]
        dominated = _dominated_by(G, G) | _dominated_by(front, G)
        keep = idx[~dominated]
        mask[keep] = True
        front = np.vstack([front, F_min[keep]])
    return mask


def _signs(objectives: list[dict[str, Any]]) -> np.ndarray:
    return np.array([-1.0 if o["direction"] == "maximize" else 1.0 for o in objectives])


# ------------------------------------------------------------------------------------------ studies


def study_row(view: StudyView, r: dict[str, Any], stamp_: dict[str, Any]) -> dict[str, Any]:
    """One row of the Studies page (``r``: a row of ``StudyView.studies``, ``stamp_``: the study's
    ``StudyView.stamp``): progress, best values, hypervolume and the last activity."""
    name = r["study"]
    meta = space_meta(view.study(name).space_yaml)
    last = view.last_hypervolume(name)
    lo_hi = view.best_scores(name) if r["complete"] else {}
    best = {o["name"]: lo_hi[o["name"]][1 if o["direction"] == "maximize" else 0]
            for o in r["objectives"] if o["name"] in lo_hi}
    return {
        "study": name, "state": r["state"], "algorithm": meta["algorithm"], "genome": meta["genome"],
        "budget": r["budget"], "done": r["complete"] + r["failed"], "complete": r["complete"],
        "failed": r["failed"], "running": r["running"], "queued": r["queued"],
        "objectives": r["objectives"], "best": best,
        "hypervolume": last["value"] if last else None,
        "last_activity": iso(max([t for t in (stamp_["latest"], r["updated"]) if t is not None], default=None)),
    }


def study(view: StudyView, name: str) -> dict[str, Any]:
    """The Study page's header: state, counts, objectives, report objectives, reference point."""
    st = view.study(name)
    meta = space_meta(st.space_yaml)
    counts = view.counts(name)
    last = view.last_hypervolume(name)
    return {
        "study": name, "state": effective_state(st.status, st.lease_expires, lease_owner=st.lease_owner),
        "budget": st.budget, "counts": counts, "objectives": st.objectives, "report": meta["report"],
        "algorithm": meta["algorithm"], "genome": meta["genome"], "reference_point": st.reference_point,
        "hypervolume": last["value"] if last else None, "created": iso(st.created),
        "lease_owner": st.lease_owner,
    }


def _floats(a: np.ndarray) -> list[float | None]:
    """An array as a JSON list, NaN as null."""
    return [None if v != v else v for v in a.tolist()]


def _seconds_since(times: list[float | None], t0: float) -> list[float | None]:
    return _floats(np.round(np.array(times, dtype=float) - t0, 3))  # None reads as NaN


def points(view: StudyView, name: str) -> dict[str, Any]:
    """Every candidate, column by column (one array per field), with its scores and whether it is on
    the front of the search objectives; what the Pareto plot, the parallel coordinates, the timeline
    and the failures list draw."""
    st = view.study(name)
    cols = view.columns(name)
    names = [o["name"] for o in st.objectives]
    t0 = st.created.timestamp()
    out: dict[str, Any] = {c: cols[c] for c in ("number", "state", "operator", "generation", "worker", "attempts",
                                                "error")}
    out["start_s"] = _seconds_since(cols["started"], t0)
    out["end_s"] = _seconds_since(cols["finished"], t0)
    scores: dict[str, np.ndarray] = cols["scores"]
    score_names = sorted(scores, key=lambda k: (k not in names, k))
    # stored scores are finite floats (the store refuses NaN and infinities): NaN here is a missing one
    complete = np.array(cols["state"], dtype=object) == "complete"
    full = complete & ~np.array(cols["estimated"], dtype=bool)  # an anchor estimate is drawn, never on the front
    on_front = np.zeros(len(complete), dtype=bool)
    if not names:
        scored = np.flatnonzero(complete)
    elif all(n in scores for n in names):
        F = np.stack([scores[n] for n in names], axis=1) * _signs(st.objectives)
        scored = np.flatnonzero(complete & np.isfinite(F).all(axis=1))
        ok = np.flatnonzero(full & np.isfinite(F).all(axis=1))
        on_front[ok[front_mask(F[ok])]] = True
    else:
        scored = np.zeros(0, dtype=int)
    return {"objectives": st.objectives, "report": [k for k in score_names if k not in names],
            "scores": {k: _floats(scores[k]) for k in score_names}, "front": on_front.tolist(), "scored": len(scored),
            **out}


def hypervolume(view: StudyView, name: str) -> dict[str, Any]:
    """The stored series (evaluations, complete, value, seconds since the study was created) at the
    evaluations where the hypervolume changed, and the last."""
    st = view.study(name)
    # a step plot needs only the points where the value changes, and the last one: the curve drawn is the
    # same, from a few hundred points instead of one per evaluation
    series = view.hypervolume_changes(name)
    return {
        "reference_point": st.reference_point,
        "evaluations": [p["evaluations"] for p in series],
        "complete": [p["complete"] for p in series],
        "value": [p["value"] for p in series],
        "seconds": [round((p["recorded"] - st.created).total_seconds(), 3) for p in series],
    }


def events(view: StudyView, name: str, limit: int) -> dict[str, Any]:
    """The study's newest ``limit`` run events (a node lost, workers back), oldest first."""
    return {"events": [{"time": iso(e["time"]), "kind": e["kind"], "message": e["message"]}
                       for e in view.events(name, limit)]}


def stamp(view: StudyView, name: str) -> dict[str, Any]:
    return stamp_json(view.stamp(name))


def stamp_json(s: dict[str, Any]) -> dict[str, Any]:
    """A ``StudyView.stamp`` as JSON."""
    return {"status": s["status"], "updated": iso(s["updated"]), "counts": s["counts"], "latest": iso(s["latest"])}


def algorithm_state(view: StudyView, name: str) -> dict[str, Any]:
    """M2N2's archive (members and, with per-example scores, what each covers) or MAP's surrogate
    (each fit's predicted front against what those candidates then scored), from the last checkpoint."""
    ck = view.store.latest_checkpoint(name)
    if ck is None:
        return {"algorithm": None}
    table, scores = view.table(name)
    by_key = {str(r[COL["proposal_key"]]): r[COL["number"]] for r in table}
    names = [o["name"] for o in view.study(name).objectives]
    if ck.algorithm == "m2n2":
        members = []
        for m in ck.state.get("archive", []):
            n = by_key.get(str(m.get("key")))
            members.append({"number": n, "samples": m.get("s"), "values": m.get("v")})
        return {"algorithm": "m2n2", "archive": members}
    if ck.algorithm in ("map", "map_async"):
        pairs = []
        for i, fit in enumerate(ck.state.get("fits", [])):
            pred, keys = fit.get("predicted_front"), fit.get("keys") or []
            if not pred:
                continue
            for k, p in zip(keys, pred, strict=False):
                n = by_key.get(str(k))
                obs = scores.get(n, {}) if n is not None else {}
                if all(x in obs for x in names):
                    pairs.append({"fit": i, "number": n, "predicted": p, "observed": [obs[x] for x in names]})
        return {"algorithm": ck.algorithm, "objectives": names, "pairs": pairs, "fits": len(ck.state.get("fits", []))}
    return {"algorithm": ck.algorithm}


# ---------------------------------------------------------------------------------------- candidate


def _sample_summary(view: StudyView, name: str, number: int, parents: list[int]) -> list[dict[str, Any]]:
    """Per objective: examples, the mean, and against each parent the examples this one gets right
    (score >= 0.5) that the parent does not, and the other way round."""
    mine = view.sample_scores(name, number)
    theirs = {p: view.sample_scores(name, p) for p in parents}  # numbers of candidates that exist
    out = []
    for obj, vals in mine.items():
        a = np.asarray(vals, dtype=float)
        row: dict[str, Any] = {"objective": obj, "examples": int(a.size),
                               "mean": float(a.mean()) if a.size else None, "parents": []}
        for p, s in theirs.items():
            b = np.asarray(s.get(obj, []), dtype=float)
            if b.size != a.size or not a.size:
                continue
            row["parents"].append({"parent": p, "mean": float(b.mean()),
                                   "gained": int(np.sum((a >= 0.5) & (b < 0.5))),
                                   "lost": int(np.sum((a < 0.5) & (b >= 0.5)))})
        out.append(row)
    return out


def _genome_view(recipe: dict[str, Any]) -> dict[str, Any]:
    """The recipe as the Candidate page draws it: a weight (and density) heatmap of layer group x
    source model for a parameter-space merge, the layer path with its scales for a data-flow one."""
    if recipe.get("kind") == "data_flow":
        return {"kind": "data_flow", "models": recipe.get("models", []), "path": recipe.get("path", []),
                "scales": recipe.get("scales", [])}
    groups = recipe.get("groups") or []
    return {
        "kind": "parameter_space", "method": recipe.get("method"), "sources": recipe.get("sources", []),
        "groups": [g.get("name") for g in groups],
        "weights": [g.get("weights") for g in groups],
        "densities": [g.get("densities") for g in groups] if any(g.get("densities") for g in groups) else None,
    }


def warm_up() -> None:
    """Import what the first candidate page needs."""
    _mergekit_yaml("{}")


def _mergekit_yaml(recipe_json: str) -> tuple[str | None, str | None]:
    """The candidate's mergekit config, or why there is none."""
    # the genome kinds and the mergekit translation (torch comes with the operators): loaded with the
    # first candidate page, or by ``warm_up`` in the background when the server starts
    from evomerge.genomes import recipe_from_json
    from evomerge.merge.mergekit_export import dump_mergekit_yaml, recipe_to_mergekit
    from evomerge.recipe import Recipe
    from evomerge.zoo import resolve_ref

    try:
        recipe = recipe_from_json(recipe_json)
        if not isinstance(recipe, Recipe):
            return None, "a data-flow candidate has no mergekit form (export writes its own model folder)"
        # mergekit reads folders, not zoo:// references (as `evomerge export` writes it)
        resolved = recipe.model_copy(update={"base": resolve_ref(recipe.base),
                                             "sources": [resolve_ref(s) for s in recipe.sources]})
        cfg = recipe_to_mergekit(resolved)
    except (ValueError, OSError, KeyError) as e:
        return None, f"no mergekit form: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    if cfg is None:
        return None, "mergekit cannot express this recipe (see `evomerge export`, which writes the model itself)"
    return dump_mergekit_yaml(cfg), None


def candidate(view: StudyView, name: str, number: int, storage_arg: str) -> dict[str, Any]:
    st = view.study(name)
    c = view.candidate(name, number)
    names = [o["name"] for o in st.objectives]
    recipe = json.loads(c.recipe_json)
    yml, why = _mergekit_yaml(c.recipe_json)
    parents, children = view.lineage(name, number)
    return {
        "study": name, "number": c.number, "state": c.state, "operator": c.operator, "generation": c.generation,
        "worker": c.worker, "attempts": c.attempts, "error": c.error, "timings": c.timings,
        "created": iso(c.created), "started": iso(c.started), "finished": iso(c.finished),
        "objectives": st.objectives,
        "scores": {k: v for k, v in c.scores.items() if k in names},
        "report_scores": {k: v for k, v in c.scores.items() if k not in names},
        "samples": _sample_summary(view, name, number, parents),
        "genome": _genome_view(recipe), "recipe": recipe, "recipe_hash": c.recipe_hash,
        "mergekit_yaml": yml, "mergekit_missing": why,
        "parents": parents, "children": children,
        "export_command": export_command(name, number, storage_arg),
    }


def export_command(name: str, number: int, storage_arg: str) -> str:
    """The shell command that exports this candidate, quoted for a POSIX shell."""
    out = f"merged-{name}-{number}".replace("/", "_")
    parts = ["evomerge", "export", name, "--candidate", str(number), "--out", out]
    if storage_arg:
        parts += ["--storage", storage_arg]
    return " ".join(shlex.quote(p) for p in parts)
