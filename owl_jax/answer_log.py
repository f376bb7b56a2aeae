"""Answers written as they are produced, and re-runs that resume from them.

An evaluation that generates answers runs for minutes on a CPU and hours on a 7B model; a wrong `--out`
or a killed process must not lose that work. So (`owl_jax.evaluate --task owleval --out FILE`):

1. `check_output_file` runs before any compute (model load included): a missing parent directory, a
   parent that is a file, a directory given as the file, or a read-only target is one `OutputError` line.
2. `AnswerLog(path, key)` reads what an earlier run of the same evaluation wrote there, so that a re-run
   asks only the questions still unanswered. A truncated last line (the process was killed mid-write:
   every line is written whole with its newline, so only the last one can lack it) is dropped from the
   file and its question asked again; any other line that is not a JSON answer means the file is not an
   answers file, and it is refused rather than overwritten.
3. `write` appends one answer per line and flushes it, so the file holds every answer produced so far.
4. `finish(records)` rewrites the file with the final records in their intended order (a temporary file
   in the same directory, then an atomic rename: an interruption there leaves the old file intact).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable


class OutputError(ValueError):
    """An output path that cannot be written, or a file that is not a resumable answers file (one line)."""


def check_output_file(path: str | os.PathLike, *, option: str = "--out") -> None:
    """Raise OutputError unless a file can be written at `path` and renamed into place there."""
    p = Path(path)
    if p.is_dir():
        raise OutputError(f"{option} {path} is a directory; name a file, e.g. {p / 'answers.jsonl'}")
    from owl_jax.paths import OutputPathError, nearest_existing, probe_writable
    parent = Path(os.path.abspath(p)).parent
    existing = nearest_existing(parent)
    if not existing.is_dir():
        raise OutputError(f"{option} {path}: {existing} is a file, not a directory")
    if existing != parent:
        raise OutputError(f"{option} {path}: directory {parent} does not exist")
    if p.exists():
        try:
            open(p, "a").close()
        except OSError as e:
            raise OutputError(f"{option} {path} is not writable ({e.strerror or e})") from None
    try:  # the directory itself must take new files: the final rewrite goes through one
        probe_writable(parent, option, path)
    except OutputPathError as e:
        raise OutputError(str(e)) from None


class AnswerLog:
    """The answers file of one evaluation run. `done` maps `key(record)` to the records already there."""

    def __init__(self, path: str | os.PathLike, key: Callable[[dict], str]):
        self.path, self.key = Path(path), key
        self.done: dict[str, dict] = {}
        self.dropped_partial = False
        self._created = not self.path.exists()
        if not self._created:
            self._read()
        self._file = open(self.path, "a", encoding="utf-8")

    def check_belongs(self, keys, model_id: str, what: str = "these questions") -> None:
        """OutputError unless every answer already in the file is to one of `keys` and by `model_id`: a
        re-run resumes its own answers, never another evaluation's (nothing is overwritten)."""
        for key, record in self.done.items():
            if key not in keys:
                raise OutputError(f"{self.path} holds an answer to {key}, which is not among {what}; "
                                  "choose another --out or delete it")
            if record.get("model_id") != model_id:
                raise OutputError(f"{self.path} holds answers of model_id {record.get('model_id')!r}, not "
                                  f"{model_id!r}; choose another --out, delete it, or pass --model-id "
                                  f"{record.get('model_id')} to resume")

    def _read(self) -> None:
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        good = 0  # bytes of complete, valid lines
        for number, raw in enumerate(lines, 1):
            last = number == len(lines)  # no newline after it: empty for a complete file
            if last and not raw:
                break
            try:
                record = json.loads(raw) if raw.strip() else None
                key = None if record is None else self.key(record)
            except (ValueError, TypeError, KeyError, AttributeError) as e:
                if last:  # written partly when the process died: drop it, its question is asked again
                    self.dropped_partial = True
                    break
                raise OutputError(f"{self.path} line {number} is not an answer ({type(e).__name__}); not an "
                                  "answers file to resume: choose another --out or delete it") from None
            if key is not None:
                if key in self.done:
                    raise OutputError(f"{self.path} line {number}: a second answer to question {key}; "
                                      "not an answers file to resume: choose another --out or delete it")
                self.done[key] = record
            good += len(raw) + 1
        if self.dropped_partial:
            with open(self.path, "r+b") as f:
                f.truncate(good)
        elif data and not data.endswith(b"\n"):  # a whole last record without its newline: complete it
            with open(self.path, "ab") as f:
                f.write(b"\n")

    def write(self, record: dict) -> None:
        """Append one answer as one line, flushed (a kill after this returns keeps it)."""
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()
        self.done[self.key(record)] = record

    def close(self) -> None:
        """Close the file; one this log created and never wrote to is removed (e.g. the model failed to load)."""
        if not self._file.closed:
            self._file.close()
            if self._created and self.path.exists() and self.path.stat().st_size == 0:
                self.path.unlink()

    def finish(self, records: Iterable[dict]) -> None:
        """Replace the file by `records`, one per line, atomically; closes the log."""
        self._file.close()
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                for record in records:
                    f.write(json.dumps(record, ensure_ascii=False) + "\n")
            os.chmod(tmp, self.path.stat().st_mode & 0o7777)  # the file's own mode, not mkstemp's 0600
            os.replace(tmp, self.path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def __enter__(self) -> "AnswerLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
