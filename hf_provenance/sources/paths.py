"""Path rules for local models: nothing we read may escape the model folder (or its HF cache repo's blobs/).

A hostile folder can hold an index naming ``../../etc/passwd``, or weight files that are symlinks to devices, FIFOs
(opening one blocks) or files elsewhere. Every file is resolved and checked *before* it is opened.
"""

from __future__ import annotations

import os
import stat

from hf_provenance.errors import ModelNotFoundError, PathEscapeError

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def is_within(path: str, root: str) -> bool:
    """True when ``path`` equals ``root`` or lies below it (both absolute, already resolved)."""
    try:
        return os.path.commonpath([path, root]) == root
    except ValueError:  # different drives
        return False


def hf_cache_repo(folder: str) -> str | None:
    """The ``models--org--name`` folder when ``folder`` is ``.../models--org--name/snapshots/<sha>``, else None."""
    parent = os.path.dirname(folder)
    repo = os.path.dirname(parent)
    if os.path.basename(parent) == "snapshots" and os.path.basename(repo).startswith("models--"):
        return repo
    return None


def allowed_roots(folder: str) -> tuple[str, ...]:
    """Where files read for a model folder may resolve to: the folder, and its cache repo's blobs/."""
    real = os.path.realpath(folder)
    repo = hf_cache_repo(real)
    return (real,) if repo is None else (real, os.path.join(repo, "blobs"))


def join_inside(folder: str, name: str) -> str | None:
    """``folder/name`` when the relative ``name`` stays inside ``folder`` lexically, else None."""
    if os.path.isabs(name) or name.startswith(("/", "\\")):
        return None
    joined = os.path.normpath(os.path.join(folder, name))
    return joined if is_within(joined, os.path.normpath(folder)) else None


def checked_file(path: str, roots: tuple[str, ...]) -> str:
    """Resolve ``path`` and return the real path when it is a regular file under one of ``roots``.

    Raises:
        PathEscapeError: the resolved path lies outside every root, or is not a regular file.
        ModelNotFoundError: nothing exists there (for a symlink: its target is missing).
    """
    real = os.path.realpath(path)
    linked = real != os.path.abspath(path)
    if not any(is_within(real, root) for root in roots):
        where = "the model folder" if len(roots) == 1 else "the model folder and its HF cache blobs/"
        raise PathEscapeError(path, f"resolves to {real}, outside {where}")
    try:
        mode = os.stat(real).st_mode
    except FileNotFoundError:
        raise ModelNotFoundError(path, f"symlink target {real} does not exist (incomplete download?)" if linked
                                 else "no such file") from None
    if not stat.S_ISREG(mode):
        kind = next((label for test, label in _KINDS if test(mode)), "a special file")
        prefix = f"resolves to {real}, which is" if linked else "is"
        raise PathEscapeError(path, f"{prefix} {kind}, not a regular file")
    return real
