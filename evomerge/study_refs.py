"""References to stored candidates, ``study://STUDY/NUMBER[?storage=URL]``, for spaces that take an earlier
search's result as a source (PS + DFS: a data-flow search over a parameter-space winner).

The storage is the ref's ``?storage=`` (everything after it, verbatim), else the space's ``storage``, else
the default storage (``$EVOMERGE_STORAGE`` or ``./evomerge.db``). A space stores the ref with its storage
written out (a relative SQLite path made absolute), so the recipes of the new study name the candidate the
same way from any directory. The stored candidate is read through a read-only store: its recipe is what
the source is built from.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

STUDY_PREFIX = "study://"
_FORM = "study://STUDY/NUMBER or study://STUDY/NUMBER?storage=URL"
_REF = re.compile(r"^study://(?P<study>[^/?]+)/(?P<number>[^/?]+)(?:\?storage=(?P<storage>.+))?$")


class StudyRefError(ValueError):
    """A study ref that is malformed or names nothing stored; the message is one line for the user."""


@dataclass(frozen=True)
class StudyRef:
    study: str
    number: int
    storage: str | None

    def text(self) -> str:
        tail = f"?storage={self.storage}" if self.storage else ""
        return f"{STUDY_PREFIX}{self.study}/{self.number}{tail}"


def is_study_ref(ref: str) -> bool:
    return isinstance(ref, str) and ref.startswith(STUDY_PREFIX)


def parse_study_ref(ref: str) -> StudyRef:
    m = _REF.match(ref.strip())
    if m is None:
        raise StudyRefError(f"{ref!r} is not a stored candidate's reference ({_FORM})")
    if not m["number"].isdigit() or int(m["number"]) < 1:
        raise StudyRefError(f"{ref!r}: the candidate number must be a positive integer ({_FORM})")
    return StudyRef(m["study"], int(m["number"]), m["storage"])


def _absolute_sqlite(url: str) -> str:
    # SQLAlchemy reads sqlite:///x.db relative to the process's directory: pin it to this one.
    head = "sqlite:///"
    if url.startswith(head) and not url.startswith(head + "/") and ":memory:" not in url:
        path, sep, query = url[len(head):].partition("?")
        return head + str(Path(path).resolve()) + sep + query
    return url


def _default_storage() -> str:
    # the store package (SQLAlchemy): only for a space that names a stored candidate; validating any
    # other space stays as light as before
    from evomerge.store import default_storage_url

    return default_storage_url()


def canonical_study_ref(ref: str, storage: str | None = None) -> str:
    """The ref with its storage written out: its own, else ``storage`` (the space's), else the default."""
    r = parse_study_ref(ref)
    url = r.storage or storage or _default_storage()
    return StudyRef(r.study, r.number, _absolute_sqlite(url)).text()


def stored_recipe_json(ref: str) -> str:
    """The recipe JSON of the complete candidate ``ref`` names (a canonical ref: its storage written out)."""
    # the store (SQLAlchemy): only when a stored candidate is looked up
    from evomerge.store import Store, StoreError

    r = parse_study_ref(ref)
    url = r.storage or _default_storage()
    try:
        store = Store(url, read_only=True)
    except (StoreError, ValueError) as e:
        raise StudyRefError(f"{ref}: cannot open its storage: {str(e).splitlines()[0]}") from None
    try:
        if not store.has_study(r.study):
            raise StudyRefError(f"{ref}: no study {r.study!r} in {store.url_display}")
        try:
            cand = store.get_candidate(r.study, r.number)
        except StoreError:
            cand = None
        if cand is None:
            raise StudyRefError(f"{ref}: study {r.study!r} has no candidate {r.number}")
        if cand.state != "complete":
            raise StudyRefError(f"{ref}: candidate {r.number} of study {r.study!r} is {cand.state}, not complete")
        return cand.recipe_json
    finally:
        store.close()
