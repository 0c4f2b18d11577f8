"""Atomic file writes: write to a temporary file beside the target, fsync, rename. Nothing half-written survives
an exception or a signal.

The file gets the target's permissions when it replaces one (a model card keeps its mode), else the usual mode of a
new file (0666 less the umask); the temporary file's own mode (0600) would otherwise make every report private."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = target.stat().st_mode & 0o7777
    except FileNotFoundError:
        mode = new_file_mode()
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _umask() -> int:
    mask = os.umask(0o022)  # read the umask (the only way is to set it), then put it back at once
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The mode a new file gets here (0666 less the umask); safetensors' ``save_file`` leaves 0600."""
    return 0o666 & ~_umask()


def publish_dir(tmp: str | os.PathLike) -> None:
    """Give a directory made by ``tempfile.mkdtemp`` (0700) the mode of a new directory (0777 less the umask),
    before it is renamed into place."""
    os.chmod(tmp, 0o777 & ~_umask())


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))
