"""Reading the text files a user hands evomerge (search spaces, merge configs), with one-line errors."""

from __future__ import annotations

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
