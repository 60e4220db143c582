"""The files a user hands evomerge (search spaces, merge configs) and the folders it writes for them,
with one-line errors: reading text, and checking an output folder before any model loads."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


class UnreadableFile(ValueError):
    """The file is missing, unreadable or not UTF-8; the message (without the path) is one line."""


def read_user_text(path: Path) -> str:
    """The file's text; anything that keeps it from being UTF-8 text is an :class:`UnreadableFile`."""
    if not path.is_file():
        raise UnreadableFile("no such file")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UnreadableFile(f"not UTF-8 text (byte {e.start} is 0x{e.object[e.start]:02x})") from None
    except OSError as e:
        raise UnreadableFile(f"cannot read: {e.strerror or type(e).__name__}") from None


def os_error_text(e: OSError) -> str:
    """An OSError as a short phrase: its reason and the file it concerns (no errno, no traceback)."""
    reason = e.strerror or str(e) or type(e).__name__
    return f"{reason}: {e.filename}" if e.filename else reason


def output_dir_problem(out: Path, *, force: bool = False) -> str | None:
    """Why a model folder must not be written at ``out`` (None: it may), checked before any model loads.

    ``out`` may be absent (its missing parents are created) or an empty folder, or with ``force`` a
    non-empty one. A symbolic link is refused, even to a folder: replacing it would write elsewhere than
    the path says (or delete the link's target). The nearest existing ancestor must take a new folder,
    which is tried, so a read-only or virtual file system (``/proc``) is refused up front too.
    """
    if out.is_symlink():
        return f"{out} is a symbolic link; give the path of a real folder"
    if out.exists():
        if not out.is_dir():
            return f"{out} exists and is not a folder"
        try:
            if any(out.iterdir()) and not force:
                return f"{out} exists and is not empty (use --force to replace it)"
        except OSError as e:
            return f"{out}: cannot read the folder: {os_error_text(e)}"
    parent = out.parent
    while not parent.exists() and not parent.is_symlink() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"{out}: {parent} is not a folder"
    try:
        Path(tempfile.mkdtemp(prefix=".evomerge-probe.", dir=parent)).rmdir()
    except OSError as e:
        return f"{out}: cannot create a folder in {parent}: {e.strerror or type(e).__name__}"
    return None


def staging_dir(out: Path) -> Path:
    """An empty folder beside ``out`` to write into and then rename to ``out``, so an interrupted write
    never leaves half a model. Made with the mode a plain ``mkdir`` would give (``mkdtemp``'s is 0700,
    which the renamed model folder would keep: unreadable to the group that shares the models)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    return tmp
