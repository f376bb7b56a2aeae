"""One writer per run directory: an advisory lock on `RUN/.lock`, held for the whole training.

Two trainings into one `training.output_dir` would interleave `metrics.jsonl`, fight over checkpoint
retention and crash inside Orbax. The train CLI takes this lock before it writes anything; a second
training fails with one line naming the holder (host, pid, start time).

The lock is `fcntl.flock` on a file in the run directory: the kernel releases it when the holder dies,
however it dies (kill -9 included), so a lock file left behind by a dead run is stale by construction and
is simply taken over — no pid guessing, and it works across hosts on file systems with working `flock`
(local disks, NFSv4, Lustre with flock mounts). Object stores (`gs://...`) have no locks: the lock is then
skipped with a warning. On multi-host runs only process 0 takes it (the other processes belong to the same
run), which is the caller's choice (`enabled`).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"


class RunDirectoryBusy(RuntimeError):
    """Another live process holds the run directory's lock. The message names it."""


def _describe(holder: dict) -> str:
    host, pid = holder.get("host", "?"), holder.get("pid", "?")
    since = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else "?"
    return f"host {host}, pid {pid}, since {when}"


class RunLock:
    """Exclusive lock of `run_dir` (see the module docstring). Use `acquire()` / `release()` or `with`."""

    def __init__(self, run_dir: str, *, enabled: bool = True):
        self.run_dir = str(run_dir)
        self.path = os.path.join(self.run_dir, LOCK_NAME)
        self.enabled = enabled
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        if not self.enabled or self._fd is not None:
            return self
        if "://" in self.run_dir:
            log.warning("%s is not a local path: no run-directory lock (make sure one training writes there)",
                        self.run_dir)
            return self
        import fcntl
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
            except (ValueError, OSError):
                holder = {}
            os.close(fd)
            raise RunDirectoryBusy(f"{self.run_dir} is in use by another training ({_describe(holder)}); wait for "
                                   f"it to finish or choose another training.output_dir") from None
        except OSError as e:  # a file system without flock
            os.close(fd)
            log.warning("cannot lock %s (%s): make sure one training writes there", self.path, e.strerror)
            return self
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                  "started": time.time()}).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        import fcntl
        try:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
