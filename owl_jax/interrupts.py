"""Ctrl-C and SIGTERM for a training run: exit at once while nothing is at stake, checkpoint once it is.

A run has two phases:

- **start-up** (config, model build, weight import, the first step's compile — up to minutes at 7B): there
  is nothing new to save, so the first Ctrl-C ends the process *at once* with a message (exit 130), and
  SIGTERM (preemption) ends it at once with exit 0 — the run directory is as resumable as before.
- **training** (from the end of the first step): SIGTERM asks for a checkpoint and a clean exit 0 after the
  current step (preemption; the job is restarted and resumes), Ctrl-C for a checkpoint and exit 130
  ("interrupted", so `train && export` stops); a second Ctrl-C exits at once, without a traceback,
  keeping the last committed checkpoint.

"At once" must hold while the main thread is inside a long C++ call (an XLA compile, a device wait) that
does not return to the interpreter: Python runs signal handlers only between bytecodes, so a handler alone
would act only after the compile. The C-level handler does write the signal number to the wakeup fd
(`signal.set_wakeup_fd`) immediately, and a watcher thread blocked on that pipe decides — it needs the GIL
only briefly, which JAX releases while compiling and waiting. Immediate exits kill the pipeline's worker
processes first (they would otherwise outlive the parent) and use `os._exit`: no interpreter shutdown that
could hang on a busy backend.

Multi-process runs leave SIGTERM to JAX's preemption service (it names one step at which every process
checkpoints); a Ctrl-C there ends this process at once with a message, since one process cannot save
alone — the peers then stop with their own error, and the last committed checkpoint is kept.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import threading
from typing import Callable

log = logging.getLogger(__name__)

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for a Ctrl-C'd program


class RunSignals:
    """Installs SIGINT (and, for one process, SIGTERM) handling for a run; see the module docstring.

    `training()` switches to the training phase; after each step the loop checks `requested` (and `signum`).
    `describe_checkpoint` tells the immediate-exit messages which checkpoint survives. `uninstall()` restores
    the previous handlers and wakeup fd. Must be created on the main thread.
    """

    def __init__(self, *, handle_sigterm: bool = True, multi_process: bool = False,
                 describe_checkpoint: Callable[[], str] | None = None,
                 exit_now: Callable[[int], None] = os._exit):
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("signal handlers can only be installed from the main thread")
        self.multi_process = multi_process
        self.describe_checkpoint = describe_checkpoint or (lambda: "")
        self.requested = False
        self.signum: int | None = None
        self.phase = "start-up"
        self._exit_now = exit_now
        self._signals = (signal.SIGINT, signal.SIGTERM) if handle_sigterm else (signal.SIGINT,)
        self._previous = {s: signal.signal(s, self._python_handler) for s in self._signals}
        self._read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        self._write_fd = write_fd
        self._previous_wakeup = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        self._closed = False
        self._watcher = threading.Thread(target=self._watch, name="owl-jax-signals", daemon=True)
        self._watcher.start()

    # The Python-level handler only has to exist (so that the C handler writes to the wakeup fd); the
    # watcher thread does the work, also while the main thread is inside a C++ call.
    @staticmethod
    def _python_handler(signum, frame) -> None:
        pass

    def add_sigterm(self) -> None:
        """Handle SIGTERM too (one-process runs, once it is known that no preemption service owns it)."""
        if signal.SIGTERM not in self._signals:
            self._signals += (signal.SIGTERM,)
            self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._python_handler)

    def training(self) -> None:
        """From now on a signal asks for a checkpoint instead of ending the process."""
        self.phase = "training"

    def _watch(self) -> None:
        while True:
            try:
                data = os.read(self._read_fd, 16)
            except OSError:
                return
            if not data or self._closed:
                return
            for signum in data:
                if signum in self._signals:
                    self._on_signal(signum)

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        kept = self.describe_checkpoint()
        kept = f"; {kept}" if kept else ""
        if self.phase == "start-up":
            if signum == signal.SIGTERM:
                self._exit(0, f"received SIGTERM before the first step: exiting (nothing new to save){kept}")
            else:
                self._exit(EXIT_INTERRUPTED, f"interrupted before the first step: exiting (nothing new to save){kept}")
        elif signum == signal.SIGINT and (self.multi_process or (self.requested and self.signum == signal.SIGINT)):
            why = ("a multi-process run checkpoints only on SIGTERM to every process (preemption)"
                   if self.multi_process else "second Ctrl-C")
            self._exit(EXIT_INTERRUPTED, f"interrupted: exiting now without a new checkpoint ({why}){kept}")
        elif not self.requested:
            self.requested, self.signum = True, signum
            what = "interrupted (Ctrl-C)" if signum == signal.SIGINT else f"received {name}"
            print(f"{what}: checkpointing after the current step, then exiting"
                  + (" (Ctrl-C again to exit at once)" if signum == signal.SIGINT else ""),
                  file=sys.stderr, flush=True)

    def _exit(self, code: int, message: str) -> None:
        print(message, file=sys.stderr, flush=True)
        for child in multiprocessing.active_children():  # decode workers would outlive os._exit
            try:
                child.kill()
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass
        try:
            sys.stdout.flush()
        except Exception:  # noqa: BLE001
            pass
        self._exit_now(code)

    @property
    def interrupted(self) -> bool:
        """A Ctrl-C (not a preemption) asked the run to stop."""
        return self.requested and self.signum == signal.SIGINT

    def uninstall(self) -> None:
        if self._closed:
            return
        self._closed = True
        signal.set_wakeup_fd(self._previous_wakeup)
        for s, previous in self._previous.items():
            signal.signal(s, previous if previous is not None else signal.SIG_DFL)
        os.close(self._write_fd)  # ends the watcher's read
        self._watcher.join(timeout=5)
        os.close(self._read_fd)

    def __enter__(self) -> "RunSignals":
        return self

    def __exit__(self, *exc) -> None:
        self.uninstall()
