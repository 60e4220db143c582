"""The `evomerge` command line: thin wrappers over space, run, study view, store and export."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.table import Table
from typer.exceptions import TyperException

from evomerge.merge_cli import merge_command
from evomerge.zoo import build_zoo

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Search for model-merge recipes.")
zoo_app = typer.Typer(no_args_is_help=True, help="The demo model zoo.")
storage_app = typer.Typer(no_args_is_help=True, help="The study database.")
app.add_typer(zoo_app, name="zoo")
app.add_typer(storage_app, name="storage")

# Piped output (CI logs, `| less`) gets rich's 80-column default, which crushes the front table.
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True)

StorageOpt = Annotated[
    str | None,
    typer.Option("--storage", help="SQLAlchemy URL of the study database [default: sqlite:///evomerge.db]"),
]
WorkersOpt = Annotated[int, typer.Option("--workers", min=1, help="Ray workers (one GPU each, or one CPU)")]
RayOpt = Annotated[str | None, typer.Option("--ray-address", help="join this Ray cluster instead of a local one")]


class UserError(Exception):
    """Bad input or a refused operation: printed as one line, exit code 2."""


def _store(url: str | None):
    from evomerge.store import Store, default_storage_url  # SQLAlchemy: not on --help or merge

    try:
        return Store(url or default_storage_url())
    except ValueError as e:
        raise UserError(str(e)) from None


def _study_space(store, study: str):
    from evomerge.space import parse_space_text  # pydantic and the kind registries: not on --help or merge

    st = store.get_study(study)
    return parse_space_text(st.space_yaml, origin=f"study {study!r}")


def _run_study(space, store, study: str, workers: int, ray_address: str | None, progress: bool) -> None:
    from evomerge.run import StudyRun  # the run package (SQLAlchemy): only when a study runs

    study_run = StudyRun(space, store, study, workers=workers, ray_address=ray_address, console=err,
                         show_progress=progress)
    try:
        study_run.run()
    except KeyboardInterrupt:
        err.print(f"paused: nothing evaluated is lost; go on with `evomerge resume {study}`")
        raise typer.Exit(130) from None
    finally:
        try:
            import ray  # optional and heavy: only after a run, to shut down the Ray it started

            if ray.is_initialized():
                ray.shutdown()
        except ImportError:
            pass
    _print_front(store, study)
    s = study_run.stats
    fid = [t["fidelity"] for t in s.timings if "fidelity" in t]
    if fid:
        stopped = sum(1 for t in s.timings if t.get("pruned"))
        how = "were estimated from their anchors" if any(t.get("estimated") for t in s.timings) else \
            "stopped after the first slice"
        err.print(f"multi-fidelity: scored {100 * sum(fid) / len(fid):.0f}% of the examples full evaluations "
                  f"need; {stopped} of {len(fid)} candidates {how}")
    if s.timings:
        mat = sum(t.get("materialize_s", 0.0) for t in s.timings) / len(s.timings)
        ev = sum(t.get("evaluate_s", 0.0) for t in s.timings) / len(s.timings)
        err.print(
            f"per candidate: materialize {mat:.3f}s, evaluate {ev:.3f}s (on a worker), "
            f"driver {s.driver_s / len(s.timings):.3f}s"
        )


def _check_algorithm(sp, path: Path, genome=None) -> None:
    """Build the space's algorithm once, so a bad name or setting fails before any study exists."""
    # the run package and the search libraries' registry: only for search and validate
    from evomerge.run import build_algorithm
    from evomerge.search import REGISTRY

    if sp.algorithm.name not in REGISTRY:
        raise UserError(f"{path}: field 'algorithm.name': unknown algorithm {sp.algorithm.name!r} "
                        f"(known: {', '.join(sorted(REGISTRY))})")
    if genome is None:
        from evomerge.genomes import make_genome  # the genome kinds: not on --help or merge

        genome = make_genome(sp)
    try:
        build_algorithm(sp, genome)
    except (ValueError, TypeError) as e:
        raise UserError(f"{path}: field 'algorithm.settings': {str(e).splitlines()[0]}") from None


def _ensure_zoo(space) -> None:
    if space.uses_zoo:
        build_zoo(log=lambda m: err.print(m, markup=False, highlight=False))


@app.command()
def search(
    space: Annotated[Path, typer.Option("--space", help="search space YAML")],
    workers: WorkersOpt = 1,
    storage: StorageOpt = None,
    study: Annotated[str | None, typer.Option("--study", help="study name [default: from the space file]")] = None,
    ray_address: RayOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print what would run, start nothing")] = False,
    progress: Annotated[bool, typer.Option(help="live progress on the terminal")] = True,
) -> None:
    """Start a new study on a search space and run it to its budget."""
    # pydantic, the genome and objective kinds: not on --help or merge
    from evomerge.genomes import describe_genome, make_genome
    from evomerge.space import dump_space, load_space

    sp = load_space(space)
    if dry_run:
        genome = make_genome(sp)
        out.print(f"study        {study or sp.name}")
        out.print(f"base         {sp.base_model or '(none: data-flow paths through the sources)'}")
        out.print(f"sources      {', '.join(sp.models)}")
        out.print(f"genome       {describe_genome(genome)}")
        out.print(f"algorithm    {sp.algorithm.name} {json.dumps(sp.algorithm.settings)}")
        out.print(f"objectives   {', '.join(f'{o.name} ({o.direction})' for o in sp.objectives)}")
        if sp.report:
            out.print(f"report       {', '.join(o.name for o in sp.report)} (front only, never steers)")
        out.print(f"budget       {sp.budget} candidates")
        out.print(f"workers      {workers}")
        out.print(f"storage      {storage or sp.storage or 'sqlite:///evomerge.db'}")
        return
    _ensure_zoo(sp)
    genome = make_genome(sp)  # checks the models now, before a study is created
    _check_algorithm(sp, space, genome)
    store = _store(storage or sp.storage)
    name = study or store.free_study_name(sp.name)
    if store.has_study(name):
        raise UserError(f"study {name!r} exists; continue it with `evomerge resume {name}` or pick --study")
    store.create_study(
        name,
        space_yaml=dump_space(sp),
        objectives=[{"name": o.name, "direction": o.direction} for o in sp.objectives],
        budget=sp.budget,
    )
    err.print(f"study [bold]{name}[/bold]: {genome.dim} genes, {sp.algorithm.name}, budget {sp.budget}, "
              f"{workers} worker(s), storage {store.url_display}")
    _run_study(sp, store, name, workers, ray_address, progress)


@app.command()
def resume(
    study: str,
    workers: WorkersOpt = 1,
    storage: StorageOpt = None,
    ray_address: RayOpt = None,
    progress: Annotated[bool, typer.Option(help="live progress on the terminal")] = True,
    force_unlock: Annotated[bool, typer.Option(
        "--force-unlock", help="take the study's lease over from the run holding it (check that it is gone first)",
    )] = False,
) -> None:
    """Go on with a study after an interruption; nothing evaluated is evaluated again."""
    store = _store(storage)
    sp = _study_space(store, study)
    _ensure_zoo(sp)
    if force_unlock:
        from evomerge.run.lease import force_unlock as take_lease  # the run package: only when a study runs

        holder = take_lease(store, study)
        if holder is not None:
            err.print(f"took the lease of study {study} over from {holder}", markup=False, highlight=False)
    _run_study(sp, store, study, workers, ray_address, progress)


@app.command()
def status(
    storage: StorageOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """List studies with candidate counts."""
    from evomerge.view import StudyView  # SQLAlchemy: not on --help or merge

    # A "running" study whose run lease has lapsed reads "interrupted" (kill -9 or a lost node leaves
    # running behind); resume picks it up.
    rows = StudyView(_store(storage)).studies()
    if as_json:
        print(json.dumps(rows, indent=2, default=str))
        return
    t = Table("study", "state", "budget", "complete", "failed", "running", "queued", "attempts")
    for r in rows:
        t.add_row(*(str(r[k]) for k in ("study", "state", "budget", "complete", "failed", "running",
                                        "queued", "attempts")))
    out.print(t)


def _print_front(store, study: str, as_json: bool = False) -> None:
    # the genome kinds and SQLAlchemy: not on --help or merge
    from evomerge.genomes import recipe_from_json, recipe_summary
    from evomerge.view import StudyView

    view = StudyView(store)
    st = view.study(study)
    rows = view.front(study)
    names = [o["name"] for o in st.objectives]
    if as_json:
        print(json.dumps([{"candidate": c.number, "scores": c.scores, "recipe_hash": c.recipe_hash,
                           "recipe": json.loads(c.recipe_json)} for c in rows], indent=2))
        return
    extra = sorted({k for c in rows for k in c.scores} - set(names))
    t = Table(title=f"Pareto front of {study} ({len(rows)} of {view.counts(study)['complete']} complete)")
    t.add_column("candidate", justify="right")
    for o in st.objectives:
        t.add_column(f"{o['name']} ({'max' if o['direction'] == 'maximize' else 'min'})", justify="right")
    for k in extra:
        t.add_column(f"{k} (held out)", justify="right")
    t.add_column("recipe summary")
    t.add_column("recipe")
    sign = {o["name"]: -1.0 if o["direction"] == "maximize" else 1.0 for o in st.objectives}
    for c in sorted(rows, key=lambda c: [sign[n] * c.scores[n] for n in names]):
        genes = recipe_summary(recipe_from_json(c.recipe_json))
        held = [f"{c.scores[k]:.4f}" if k in c.scores else "-" for k in extra]
        t.add_row(str(c.number), *(f"{c.scores[n]:.4f}" for n in names), *held, genes, c.recipe_hash)
    out.print(t)


@app.command()
def front(
    study: str,
    storage: StorageOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Print the Pareto front of a study, computed from the store."""
    _print_front(_store(storage), study, as_json)


@app.command()
def export(
    study: str,
    candidate: Annotated[int, typer.Option("--candidate", help="candidate number (see `front`)")],
    out_dir: Annotated[Path, typer.Option("--out", help="output folder (must not exist or be empty)")],
    storage: StorageOpt = None,
) -> None:
    """Write a candidate as a Hugging Face model folder with a model card naming its recipe."""
    from evomerge.export import export_candidate  # the genome kinds' exporters: not on --help or merge

    store = _store(storage)
    path = export_candidate(store, study, candidate, out_dir)
    out.print(f"wrote {path}")


@app.command()
def validate(space: Annotated[Path, typer.Option("--space", help="search space YAML")]) -> None:
    """Check a search space file."""
    from evomerge.space import load_space  # pydantic and the kind registries: not on --help or merge

    sp = load_space(space)
    _check_algorithm(sp, space)
    if sp.hub_models:
        out.print(f"note: {', '.join(sp.hub_models)} are hub models; their weights are fetched at run time")
    out.print(f"{space}: ok ({len(sp.models)} models, {len(sp.objectives)} objectives, "
              f"{sp.algorithm.name}, budget {sp.budget})")


@zoo_app.command("build")
def zoo_build(force: Annotated[bool, typer.Option(help="rebuild even if cached")] = False) -> None:
    """Build (or reuse) the demo zoo: a tiny base model and experts trained here."""
    path = build_zoo(force=force, log=lambda m: err.print(m, markup=False, highlight=False))
    out.print(str(path))


app.command("merge")(merge_command)


@storage_app.command("upgrade")
def storage_upgrade(storage: StorageOpt = None) -> None:
    """Apply the schema migrations to the study database."""
    store = _store(storage)  # opening applies pending migrations
    before, after = store.revision_at_open, store.current_revision()
    if before == after:
        out.print(f"{store.url_display}: schema already at {after}")
    else:
        out.print(f"{store.url_display}: schema upgraded from {before or 'empty'} to {after}")


# Errors printed as one line with exit code 2, by (module, class). Looked up only once something was
# raised, in the modules already imported: an exception of a class whose module was never imported
# cannot have been raised, and importing run/export/store up front (torch, SQLAlchemy, Ray) would
# cost seconds of start-up on every command, `--help` and `merge` included.
USER_ERRORS = (
    ("evomerge.space", "SpaceError"),
    ("evomerge.run.loop", "RunError"),
    ("evomerge.run.pool", "PoolError"),
    ("evomerge.store.errors", "StoreError"),
    ("evomerge.export", "ExportError"),
)


def _user_error_types() -> tuple[type[BaseException], ...]:
    found = [getattr(sys.modules[m], name, None) for m, name in USER_ERRORS if m in sys.modules]
    return (UserError, *(t for t in found if isinstance(t, type)))


def _fail(message: str, fallback: str) -> NoReturn:
    """Print ``error: <first line>`` on stderr and exit with code 2."""
    lines = message.strip().splitlines()
    print(f"error: {lines[0] if lines else fallback}", file=sys.stderr)
    sys.exit(2)


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        # Without standalone mode click returns an Exit's code instead of raising it.
        rc = app(standalone_mode=False)
        if isinstance(rc, int) and rc:
            sys.exit(rc)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except (KeyboardInterrupt, typer.Abort):
        sys.exit(130)
    except TyperException as e:
        # typer 0.29 raises its own copy of click's exceptions (typer._click), all under TyperException:
        # click's own classes never match them.
        if type(e).__name__ == "NoArgsIsHelpError":  # a bare group (`evomerge`, `evomerge zoo`): its help
            print(e.format_message())
            sys.exit(0)
        _fail(e.format_message(), type(e).__name__)
    except Exception as e:
        if isinstance(e, _user_error_types()):
            _fail(str(e), type(e).__name__)
        raise


if __name__ == "__main__":
    main()
