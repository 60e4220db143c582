"""The `evomerge` command line: thin wrappers over space, run, study view, store and export.

Every command answers its light part (arguments, the space file, the store, the target folder) before
it imports torch, Ray, transformers or lm-eval, so `--help`, `status`, `front`, `validate` and every
error come back at once. A command is a function decorated with ``@app.command()`` (or a sub-app's):
the app's classes give it plain help (every default shown, no markup) and a usage line in capitals.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from typer.core import TyperArgument, TyperCommand, TyperGroup
from typer.exceptions import TyperException

from evomerge.merge_cli import merge_command
from evomerge.zoo import RECIPES, ZOO_VERSION


class Command(TyperCommand):
    """A command whose usage line and help name arguments by their metavar alone (``STUDY``, not
    ``{study}`` or ``STUDY <str>``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for p in self.params:
            if isinstance(p, TyperArgument) and p.metavar is not None:
                p.display_type_rich = lambda ctx: None  # the metavar says it; "<str>" adds nothing

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for p in self.get_params(ctx):
            if isinstance(p, TyperArgument):
                pieces.append(p.display_name_raw.upper() if p.required else f"[{p.display_name_raw.upper()}]")
            else:
                pieces.extend(p.get_usage_pieces(ctx))
        return pieces


class App(typer.Typer):
    """A typer app whose commands default to :class:`Command` and whose help is plain text: rich markup
    would read ``[default: ...]`` in a help text as a tag and drop it."""

    def __init__(self, **kwargs: Any) -> None:
        # click caps help at 80 columns and cuts the command list's one-liners to fit
        super().__init__(rich_markup_mode=None, cls=TyperGroup, context_settings={"max_content_width": 120},
                         **kwargs)

    def command(self, *args: Any, cls: type[TyperCommand] | None = None, **kwargs: Any) -> Any:
        return super().command(*args, cls=cls or Command, **kwargs)


app = App(no_args_is_help=True, help="Search for model-merge recipes: evolutionary, multi-objective, resumable.")
zoo_app = App(no_args_is_help=True, add_completion=False, help="The demo model zoo.")
storage_app = App(no_args_is_help=True, add_completion=False, help="The study database.")
app.add_typer(zoo_app, name="zoo")
app.add_typer(storage_app, name="storage")

# Not a terminal (a log file, CI): no hard line breaks inside a message, the reader's viewer wraps it.
err = Console(stderr=True, soft_wrap=not sys.stderr.isatty())
DEFAULT_STORAGE = "sqlite:///evomerge.db"


def out_console(wide: bool = False) -> Console:
    """stdout: the terminal's width, else ``$COLUMNS`` or 100 (a file, a pipe, CI); ``wide``: no limit."""
    if wide:
        return Console(width=100_000, soft_wrap=True)
    if sys.stdout.isatty():
        return Console()
    cols = os.environ.get("COLUMNS", "")
    return Console(width=int(cols) if cols.isdigit() and int(cols) > 20 else 100, soft_wrap=True)


StorageOpt = Annotated[str | None, typer.Option(
    "--storage", metavar="URL", show_default=False,
    help=f"SQLAlchemy URL of the study database  [default: $EVOMERGE_STORAGE, else {DEFAULT_STORAGE}]")]
WorkersOpt = Annotated[int, typer.Option("--workers", min=1, metavar="N",
                                         help="Ray workers (one GPU each, or one CPU)")]
RayOpt = Annotated[str | None, typer.Option(
    "--ray-address", metavar="HOST:PORT", show_default=False,
    help="join this Ray cluster  [default: start a local one, 127.0.0.1 only]")]
ProgressOpt = Annotated[bool, typer.Option(help="show progress (a live bar on a terminal, else a line per result)")]
LogFormatOpt = Annotated[str, typer.Option(
    "--log-format", metavar="auto|rich|plain|json",
    help="rich: live bar; plain: one timestamped line per event; json: one object per line; auto: rich on a "
         "terminal, else plain")]
JsonOpt = Annotated[bool, typer.Option("--json", help="machine-readable output")]
SpaceOpt = Annotated[Path, typer.Option("--space", metavar="FILE", help="search space YAML", show_default=False)]
StudyArg = Annotated[str, typer.Argument(metavar="STUDY", help="study name (see `evomerge status`)",
                                         show_default=False)]


class UserError(Exception):
    """Bad input or a refused operation: printed as one line, exit code 2."""


def _store(url: str | None, read_only: bool = False):
    """The study database; ``read_only`` for commands that only look (they never create or upgrade it)."""
    from evomerge.store import NoDatabaseFile, Store, default_storage_url  # SQLAlchemy: not on --help or merge

    try:
        return Store(url or default_storage_url(), read_only=read_only)
    except NoDatabaseFile:
        raise  # `status` reads it as "no studies yet"; elsewhere it is a one-line error like any store's
    except ValueError as e:
        raise UserError(str(e)) from None


def _log(fmt: str):
    # the run package (SQLAlchemy, the view): only for the commands that run a study
    from evomerge.run.progress import EventLog, resolve_log_format

    try:
        return EventLog(resolve_log_format(fmt), err)
    except ValueError as e:
        raise UserError(str(e)) from None


def _run_study(space, store, study: str, workers: int, ray_address: str | None, progress: bool, log,
               storage: str | None) -> None:
    from evomerge.run import StudyRun  # the run package (SQLAlchemy): only when a study runs

    study_run = StudyRun(space, store, study, workers=workers, ray_address=ray_address, console=err,
                         show_progress=progress, log=log)
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
    if study_run.already_done:
        counts = study_run.store.study_counts(study)
        log.event("run", f"study {study} was already done ({counts['complete']} complete, {counts['failed']} "
                  f"failed of budget {space.budget}): nothing to evaluate; its front:")
    _print_front(store, study, storage=storage)
    s = study_run.stats
    fid = [t["fidelity"] for t in s.timings if "fidelity" in t]
    if fid:
        stopped = sum(1 for t in s.timings if t.get("pruned"))
        how = "were estimated from their anchors" if space.evaluation.multi_fidelity.method == "anchors" else \
            "stopped after the first slice"
        log.event("run", f"multi-fidelity: scored {100 * sum(fid) / len(fid):.0f}% of the examples full "
                  f"evaluations need; {stopped} of {len(fid)} candidates {how}")
    if s.timings:
        mat = sum(t.get("materialize_s", 0.0) for t in s.timings) / len(s.timings)
        ev = sum(t.get("evaluate_s", 0.0) for t in s.timings) / len(s.timings)
        log.event("run", f"per candidate: materialize {mat:.3f}s, evaluate {ev:.3f}s (on a worker), "
                  f"driver {s.driver_s / len(s.timings):.3f}s")


def _space_file(path: Path) -> None:
    """A missing space file is refused before pydantic and the kind registries are imported."""
    if not path.is_file():
        raise UserError(f"{path}: no such file")


def _check_algorithm(sp, path: Path, genome=None, build: bool = True) -> None:
    """Check the space's algorithm before any study exists: its name and setting names always; with
    ``build``, by building it (which imports its library: cma, pymoo, optuna cost 0.3-1.5 s)."""
    # the search registry (numpy only) and the genome kinds: only for search and validate
    from evomerge.genomes import make_genome
    from evomerge.run.problem import algorithm_settings, build_algorithm
    from evomerge.search import REGISTRY

    cls = REGISTRY.get(sp.algorithm.name)
    if cls is None:
        raise UserError(f"{path}: field 'algorithm.name': unknown algorithm {sp.algorithm.name!r} "
                        f"(known: {', '.join(sorted(REGISTRY))})")
    genome = genome if genome is not None else make_genome(sp)
    try:
        if build:
            build_algorithm(sp, genome)
            return
        unknown = sorted(set(algorithm_settings(sp, genome)) - set(cls.default_settings))
        if unknown:
            known = ", ".join(sorted(cls.default_settings)) or "none"
            raise ValueError(f"algorithm {cls.name!r}: unknown setting(s) {unknown}; known: {known}")
    except (ValueError, TypeError) as e:
        raise UserError(f"{path}: field 'algorithm.settings': {str(e).splitlines()[0]}") from None


def _ensure_zoo(space, log) -> None:
    if space.uses_zoo:
        from evomerge.zoo import build_zoo  # torch comes with a build, not with --help

        for version in space.zoo_versions:
            build_zoo(log=lambda m: log.event("zoo", m), version=version)


@app.command()
def search(
    space: SpaceOpt,
    workers: WorkersOpt = 1,
    budget: Annotated[int | None, typer.Option(
        "--budget", metavar="N", show_default=False,
        help="candidates to evaluate  [default: the space's budget]")] = None,
    seed: Annotated[int | None, typer.Option(
        "--seed", metavar="S", show_default=False,
        help="seed of the whole search  [default: the space's seed]")] = None,
    overrides: Annotated[list[str] | None, typer.Option(
        "--set", metavar="KEY=VALUE", show_default=False,
        help="set a field of the space, by its dotted path (algorithm.settings.pop_size=8, objectives.0.limit=50); "
             "repeatable; checked like the file and recorded with the study  [default: none]")] = None,
    storage: StorageOpt = None,
    study: Annotated[str | None, typer.Option(
        "--study", metavar="NAME", show_default=False,
        help="study name  [default: the space's name, or its file name; demo-2, ... when taken]")] = None,
    ray_address: RayOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print what would run, start nothing")] = False,
    progress: ProgressOpt = True,
    log_format: LogFormatOpt = "auto",
) -> None:
    """Start a new study on a search space and run it to its budget."""
    _space_file(space)
    # pydantic, the genome and objective kinds: not on --help or merge
    from evomerge.genomes import describe_genome, make_genome
    from evomerge.space import dump_space, load_space

    sets = [*(overrides or []), *([f"budget={budget}"] if budget is not None else []),
            *([f"seed={seed}"] if seed is not None else [])]
    log = _log(log_format)
    sp = load_space(space, sets)
    if dry_run:
        genome = make_genome(sp)
        _check_algorithm(sp, space, genome, build=False)
        out = out_console()
        for k, v in (
            ("study", study or sp.name),
            ("base", sp.base_model or "(none: data-flow paths through the sources)"),
            ("sources", ", ".join(sp.models)),
            ("genome", describe_genome(genome)),
            ("algorithm", f"{sp.algorithm.name} {json.dumps(sp.algorithm.settings)}"),
            ("objectives", ", ".join(f"{o.name} ({o.direction})" for o in sp.objectives)),
            *([("report", f"{', '.join(o.name for o in sp.report)} (front only, never steers)")] if sp.report else []),
            ("budget", f"{sp.budget} candidates, seed {sp.seed}"),
            *([("overrides", " ".join(sets))] if sets else []),
            ("workers", str(workers)),
            ("storage", storage or sp.storage or os.environ.get("EVOMERGE_STORAGE") or DEFAULT_STORAGE),
        ):
            out.print(f"{k:12s} {v}", markup=False, highlight=False)
        return
    genome = make_genome(sp)
    _check_algorithm(sp, space, genome)
    store = _store(storage or sp.storage)
    name = study or store.free_study_name(sp.name)
    if store.has_study(name):
        raise UserError(f"study {name!r} exists; continue it with `evomerge resume {name}` or pick --study")
    _ensure_zoo(sp, log)  # after every check: a bad argument never waits on a zoo build
    store.create_study(
        name,
        space_yaml=dump_space(sp, space, sets),
        objectives=[{"name": o.name, "direction": o.direction} for o in sp.objectives],
        budget=sp.budget,
    )
    log.event("run", f"study {name}: {genome.dim} genes, {sp.algorithm.name}, budget {sp.budget}, seed {sp.seed}, "
              f"{workers} worker(s), storage {store.url_display}" + (f", --set {' '.join(sets)}" if sets else ""),
              study=name)
    _run_study(sp, store, name, workers, ray_address, progress, log, storage)


@app.command()
def resume(
    study: StudyArg,
    workers: WorkersOpt = 1,
    storage: StorageOpt = None,
    ray_address: RayOpt = None,
    progress: ProgressOpt = True,
    log_format: LogFormatOpt = "auto",
    force_unlock: Annotated[bool, typer.Option(
        "--force-unlock", help="take the study's lease over from the run holding it (check that it is gone first)",
    )] = False,
) -> None:
    """Go on with a study after an interruption, with the space (and --set overrides) it was started with."""
    from evomerge.space import parse_space_text  # pydantic and the kind registries: not on --help or merge

    log = _log(log_format)
    store = _store(storage)
    sp = parse_space_text(store.get_study(study).space_yaml, origin=f"study {study!r}")
    _ensure_zoo(sp, log)
    if force_unlock:
        from evomerge.run.lease import force_unlock as take_lease  # the run package: only when a study runs

        holder = take_lease(store, study)
        if holder is not None:
            log.event("run", f"took the lease of study {study} over from {holder}")
    _run_study(sp, store, study, workers, ray_address, progress, log, storage)


@app.command()
def status(storage: StorageOpt = None, as_json: JsonOpt = False) -> None:
    """List the studies: state, candidates done of the budget, best value per objective, time taken, nodes lost."""
    # SQLAlchemy and the view: not on --help or merge
    from evomerge.store import NoDatabaseFile
    from evomerge.tables import status_events, status_rows, status_table
    from evomerge.view import StudyView

    # A "running" study whose run lease has lapsed reads "interrupted" (kill -9 or a lost node leaves
    # running behind); resume picks it up.
    try:
        store = _store(storage, read_only=True)
    except NoDatabaseFile as e:  # a fresh folder: no studies, not an error
        print("[]" if as_json else f"no studies yet: no database at {e.path}; start one with "
              "`evomerge search --space FILE`")
        return
    rows = status_rows(StudyView(store))
    if as_json:
        print(json.dumps(rows, indent=2, default=str))
        return
    if not rows:
        print(f"no studies in {store.url_display}; start one with `evomerge search --space FILE`")
        return
    out_console().print(status_table(rows))
    news = status_events(rows, width=98)
    if news:  # a lost node, and whether the workers came back: the run printed it, the store kept it
        print("\ncluster events:\n" + "\n".join(f"  {line}" for line in news))


def _print_front(store, study: str, as_json: bool = False, wide: bool = False, storage: str | None = None) -> None:
    # the genome kinds and SQLAlchemy: not on --help or merge
    from evomerge.tables import front_json, load_front, print_front
    from evomerge.view import StudyView

    front = load_front(StudyView(store), study)
    if as_json:
        print(json.dumps(front_json(front), indent=2))
        return
    print_front(front, out_console(wide), wide=wide, storage=storage)


@app.command()
def front(
    study: StudyArg,
    storage: StorageOpt = None,
    wide: Annotated[bool, typer.Option("--wide", help="the whole recipe and its hash, however wide")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Print the Pareto front of a study, computed from the store."""
    _print_front(_store(storage, read_only=True), study, as_json, wide, storage)


@app.command()
def export(
    study: StudyArg,
    candidate: Annotated[int, typer.Option("--candidate", metavar="N", help="candidate number (see `front`)",
                                           show_default=False)],
    out_dir: Annotated[Path, typer.Option("--out", metavar="DIR", help="output folder (must not exist or be empty)",
                                          show_default=False)],
    storage: StorageOpt = None,
) -> None:
    """Write a candidate as a Hugging Face model folder, with a model card and a mergekit config."""
    from evomerge.export import export_candidate  # the store and the kinds' exporters: not on --help or merge

    path = export_candidate(_store(storage, read_only=True), study, candidate, out_dir)
    out_console().print(f"wrote {path}", markup=False, highlight=False)


@app.command()
def validate(space: SpaceOpt) -> None:
    """Check a search space file: every field, its models' configs and its task files, without loading weights."""
    _space_file(space)
    from evomerge.space import load_space  # pydantic and the kind registries: not on --help or merge

    sp = load_space(space)
    _check_algorithm(sp, space, build=False)
    out = out_console()
    if sp.hub_models:
        out.print(f"note: {', '.join(sp.hub_models)} are hub models; their weights are fetched at run time",
                  markup=False, highlight=False)
    out.print(f"{space}: ok ({len(sp.models)} models, {len(sp.objectives)} objectives, "
              f"{sp.algorithm.name}, budget {sp.budget})", markup=False, highlight=False)


@zoo_app.command("build")
def zoo_build(
    force: Annotated[bool, typer.Option(help="rebuild even if cached")] = False,
    version: Annotated[int, typer.Option(
        "--version", metavar="N", min=1, help="the zoo version to build (zoo://vN/NAME names one)")] = ZOO_VERSION,
) -> None:
    """Build (or reuse) the demo zoo: a tiny base model and experts trained here."""
    if version not in RECIPES:
        raise UserError(f"--version {version}: unknown zoo version; known: {', '.join(str(v) for v in RECIPES)}")
    from evomerge.zoo import build_zoo, built_reference_lines, is_complete, zoo_path  # torch comes with a build

    say = lambda m: err.print(m, markup=False, highlight=False)  # noqa: E731
    built = is_complete(zoo_path(version=version)) and not force
    path = build_zoo(force=force, version=version, log=say)
    if built:  # a fresh build has said it already
        for line in built_reference_lines(path):
            say(line)
    print(path)


app.command("merge")(merge_command)


@storage_app.command("upgrade")
def storage_upgrade(storage: StorageOpt = None) -> None:
    """Apply the schema migrations to the study database."""
    store = _store(storage)  # opening applies pending migrations
    before, after = store.revision_at_open, store.current_revision()
    if before == after:
        print(f"{store.url_display}: schema already at {after}")
    else:
        print(f"{store.url_display}: schema upgraded from {before or 'empty'} to {after}")


@storage_app.command("copy")
def storage_copy(
    src: Annotated[str, typer.Argument(metavar="SRC_URL", help="storage URL to copy from (read only)")],
    dst: Annotated[str, typer.Argument(metavar="DST_URL", help="storage URL to copy into (schema made or upgraded)")],
    study: Annotated[str | None, typer.Option("--study", metavar="NAME", show_default=False,
                                              help="copy this study only [default: every study]")] = None,
    as_name: Annotated[str | None, typer.Option("--as", metavar="NEW_NAME", show_default=False,
                                                help="the copy's name (with --study) [default: the same]")] = None,
) -> None:
    """Copy studies between databases (SQLite <-> PostgreSQL): every row, all or nothing; resumable there."""
    import time  # kept inside this command, so its diff stays one block

    from evomerge.store.copy import copy_studies  # SQLAlchemy: not on --help or merge

    t0 = time.perf_counter()
    try:
        copied = copy_studies(src, dst, study=study, rename=as_name)
    except ValueError as e:  # a bad URL, a name taken at the destination
        raise UserError(str(e)) from None
    out = out_console()
    for c in copied:
        out.print(f"copied {c.source}" + (f" as {c.name}" if c.name != c.source else "") + f": {c.candidates} "
                  f"candidates, {c.scores} scores, {c.samples} per-example score rows, {c.checkpoints} checkpoints",
                  markup=False, highlight=False)
    out.print(f"{len(copied)} studies, {sum(c.rows for c in copied)} rows in {time.perf_counter() - t0:.2f}s"
              if copied else "no studies to copy", markup=False, highlight=False)


@app.command()
def dashboard(
    storage: StorageOpt = None,
    host: Annotated[str, typer.Option("--host", metavar="HOST",
                                      help="address to listen on (127.0.0.1: this machine only)")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, metavar="PORT", help="port to listen on")] = 8000,
) -> None:
    """Serve the read-only web dashboard of the study database (http://127.0.0.1:8000/ by default)."""
    from evomerge.dashboard import serve  # FastAPI and uvicorn: only when the dashboard runs
    from evomerge.store import default_storage_url  # SQLAlchemy: not on --help or merge
    from evomerge.store.engine import parse_url

    url = storage or default_storage_url()
    try:
        parse_url(url)
    except ValueError as e:
        raise UserError(str(e)) from None
    serve(url, host, port, storage_arg=storage or "",
          say=lambda m: err.print(m, markup=False, highlight=False, soft_wrap=True))


# Errors printed as one line with exit code 2, by (module, class). Looked up only once something was
# raised, in the modules already imported: an exception of a class whose module was never imported
# cannot have been raised, and importing run/export/store up front (torch, SQLAlchemy, Ray) would
# cost seconds of start-up on every command, `--help` and `merge` included.
USER_ERRORS = (
    ("evomerge.genomes.base", "SpaceError"),
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
        rc = app(standalone_mode=False, prog_name="evomerge")  # also when run as `python -m evomerge.cli`
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
