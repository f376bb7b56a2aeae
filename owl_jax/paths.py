"""Checks of output locations before any compute: a mistake in a path costs one line, not a run.

Every CLI that writes (train, evaluate, make_shards, export) checks where it will write before it reads,
builds or compiles anything, with the same primitive: find the nearest existing directory on the way to
the target, refuse when a regular file sits there, and prove it takes new files by creating and removing a
probe file. The probe — not `os.access` — is what tells a read-only mount or missing permission (and it is
right when running as root, where permission bits say nothing). Object-store paths (`gs://...`) are left
to their own libraries.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path


class OutputPathError(ValueError):
    """An output path cannot be created or written. The message is one line naming the path and why."""


def _reason(e: OSError) -> str:
    if e.errno in (errno.ENOTDIR, errno.EEXIST):
        return "a part of the path is a file, not a directory"
    if e.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if e.errno == errno.EROFS:
        return "read-only file system"
    if e.errno == errno.ENOSPC:
        return "no space left on the device"
    return e.strerror or type(e).__name__


def nearest_existing(path: str | os.PathLike) -> Path:
    """`path` itself if it exists, else its closest existing ancestor."""
    p = Path(os.path.abspath(path))
    return next(q for q in (p, *p.parents) if q.exists() or q.is_symlink())


def probe_writable(directory: str | os.PathLike, what: str, target: str | os.PathLike | None = None) -> None:
    """Raise OutputPathError unless a new file can be created in the existing `directory`."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=directory)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        shown = target if target is not None else directory
        where = f" (in {directory})" if target is not None and Path(directory) != Path(target) else ""
        raise OutputPathError(f"{what} {shown} cannot be written{where}: {_reason(e)}") from None


def check_writable_dir(path: str | os.PathLike, what: str, *, create: bool = True) -> None:
    """The directory `path` exists or can be created, and takes new files; with `create` it is created
    (parents included) now, otherwise nothing is created (the caller creates it once its inputs are good)."""
    path = os.fspath(path)
    if "://" in path:
        return
    existing = nearest_existing(path)
    if not existing.is_dir():
        raise OutputPathError(f"{what} {path}: {existing} is a file, not a directory")
    if create:
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            raise OutputPathError(f"{what} {path} cannot be written: {_reason(e)}") from None
        existing = Path(path)
    probe_writable(existing, what, path)
