"""Writing the study commands' HTML pages without destroying what is already there.

A page replaces an existing file only if that file is a page these commands wrote (recognised
by its ``<meta name="generator">``), or with ``overwrite=True``; never, even then, a file it must
protect (a study's ``study.json`` and response database, the trial table being analysed),
whatever the path that reaches it (a symlink, ``..``, a hard link). Writes go through
:func:`actclust.io.atomic.write`, so a failed or killed write leaves the old file whole.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..exceptions import ParameterError, RunExistsError
from ..io import atomic
from .folder import DB_FILE, STUDY_FILE

__all__ = ["write_page", "check_page", "study_files", "GENERATOR_MARK"]

GENERATOR_MARK = '<meta name="generator" content="actclust study'  # the prefix of every page we write
_SNIFF = 4096  # bytes read to recognise one of our pages


def study_files(folder) -> list:
    """A study folder's own files, which no page may replace: its study and its responses (with SQLite's side files)."""
    folder = Path(folder)
    return [folder / STUDY_FILE] + [folder / (DB_FILE + s) for s in ("", "-wal", "-shm", "-journal")]


def _same(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)  # a hard link is another name for the same file
    except OSError:
        return False


def _ours(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return GENERATOR_MARK.encode() in f.read(_SNIFF)
    except OSError:
        return False


def check_page(path, *, overwrite: bool = False, protected=()) -> Path:
    """Raise unless a page may be written to ``path`` (see the module docstring); callers check before long work."""
    path = Path(path)
    for keep in protected:
        keep = Path(keep)
        if _same(path, keep):
            raise ParameterError(f"Refusing to write the page to {path}: it is {keep}, which the analysis reads "
                                 "(overwriting it would lose data), with or without --overwrite. Choose another file.")
    if path.is_dir():
        raise ParameterError(f"{path} is a folder; --html takes a file name, e.g. {path / 'analysis.html'}.")
    if path.exists() and not overwrite and not _ours(path):
        raise RunExistsError(f"{path} already exists and is not a page written by actclust study; pass --overwrite to "
                             "replace it, or choose another file.")
    if not path.parent.is_dir():
        raise ParameterError(f"Cannot write {path}: its folder {path.parent} does not exist.")
    return path


def write_page(path, text: str, *, overwrite: bool = False, protected=()) -> Path:
    """Write ``text`` to ``path`` (see the module docstring); returns the path written."""
    path = check_page(path, overwrite=overwrite, protected=protected)
    # one of ours, or none checked: a page written meanwhile by another analysis is replaced; a file of the user's
    # made meanwhile is not (it was: an outside check of the report's same write)
    atomic.write(path, text.encode("utf-8"), what="page", replace=overwrite or _ours(path))
    return path
