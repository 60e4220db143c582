"""``evomerge merge CONFIG --out DIR``: a one-off merge from an evomerge recipe or a mergekit YAML.

Registered in :mod:`evomerge.cli` with ``app.command("merge")(merge_command)``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from evomerge.files import output_dir_problem


def merge_command(
    config: Annotated[Path, typer.Argument(metavar="CONFIG", help="an evomerge recipe (.json) or a mergekit YAML",
                                          show_default=False)],
    out: Annotated[Path, typer.Option("--out", metavar="DIR", help="output folder (must not exist or be empty)")],
    force: Annotated[bool, typer.Option("--force", help="replace a non-empty output folder")] = False,
    dtype: Annotated[
        str | None,
        typer.Option(
            "--dtype", metavar="DTYPE", show_default=False,
            help="output dtype: float32, float16, bfloat16  [default: the config's, else the base's]"
        ),
    ] = None,
    compute_dtype: Annotated[
        str,
        typer.Option(
            "--compute-dtype", metavar="DTYPE",
            help="dtype the sources are held in while merging (operators compute in float32)"
        ),
    ] = "float32",
    device: Annotated[
        str, typer.Option("--device", metavar="DEVICE", help="where to merge: cpu, cuda or cuda:N")
    ] = "cpu",
    print_yaml: Annotated[
        bool, typer.Option("--print-mergekit", help="also print the recipe as a mergekit YAML when expressible")
    ] = False,
) -> None:
    """Merge models once from an evomerge recipe or a mergekit YAML and write a Hugging Face folder."""
    # what needs no engine is refused before torch is imported (seconds): the target, the device
    problem = output_dir_problem(out, force=force)
    if problem is None and not (device == "cpu" or device.startswith("cuda")):
        problem = f"--device must be cpu, cuda or cuda:N, not {device!r}"
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        raise typer.Exit(2)
    # the merge engine loads torch: only this command pays for it, not the CLI's other commands
    from evomerge.merge.build import merge_to_folder, os_error_text
    from evomerge.merge.lora import LoraError
    from evomerge.merge.mergekit_export import dump_mergekit_yaml, recipe_to_mergekit
    from evomerge.merge.mergekit_io import dtype_of, load_merge_config
    from evomerge.merge.mergekit_settings import ConfigError

    t0 = time.perf_counter()
    try:
        job = load_merge_config(config)
        cdt = dtype_of(compute_dtype)
        if dtype is not None:
            dtype_of(dtype)
        if not (device == "cpu" or device.startswith("cuda")):
            raise ConfigError(f"--device must be cpu, cuda or cuda:N, not {device!r}")
        if device.startswith("cuda"):
            import torch  # loaded by the engine above already; named here for the CUDA check

            if not torch.cuda.is_available():
                raise ConfigError(f"--device {device}: no CUDA device is visible to this process")
        path = merge_to_folder(job, out, force=force, compute_dtype=cdt, out_dtype=dtype, device=device)
    except (ConfigError, LoraError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        raise typer.Exit(2) from None
    except KeyError as e:  # a tensor missing from a source: one line too
        print(f"error: {e.args[0] if e.args else 'missing tensor'}", file=sys.stderr)
        raise typer.Exit(2) from None
    except OSError as e:  # a source file missing or unreadable (its args[0] would be the bare errno)
        print(f"error: {os_error_text(e)}", file=sys.stderr)
        raise typer.Exit(2) from None
    for note in job.notes:
        print(f"note: {note}", file=sys.stderr)
    r = job.recipe
    print(f"wrote {path} ({r.method}, {len(r.sources)} source(s), recipe {r.hash()}, {time.perf_counter() - t0:.1f}s)")
    if print_yaml:
        cfg = recipe_to_mergekit(r)
        print(dump_mergekit_yaml(cfg) if cfg is not None else "# not expressible as a mergekit config")
