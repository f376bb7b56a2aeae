"""What every benchmark module shares: the question type, one-line data errors, file readers, prompts.

A benchmark module reads its benchmark's own published files into `Question`s (`load`), scores answers
(`score`), formats its table (`table`) and writes the files its official scorer or leaderboard takes
(`write_official`). Generation, the answers file, resuming and the score files are `owl_jax.evals.run`'s.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

#: The instruction LLaVA-1.5 appends to short-answer questions (VQAv2, GQA, TextVQA, POPE, MME).
SHORT_ANSWER = "Answer the question using a single word or phrase."
#: The instruction appended to multiple-choice questions (ScienceQA, MMBench, SEED-Bench).
MULTIPLE_CHOICE = "Answer with the option's letter from the given choices directly."
#: The caption instruction (LLaVA-1.5's COCO caption prompt, as lmms-eval asks it).
CAPTION = "Provide a one-sentence caption for the provided image."
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class BenchmarkError(ValueError):
    """A benchmark file that is missing, unreadable or not in the published format: one line naming what."""


@dataclasses.dataclass(frozen=True)
class Question:
    """One generation: `text` is asked (the instruction suffix appended) about `image` — a path under the
    image root, encoded image bytes (MMBench's base64 column), or None.

    `fields` go into the answer record as they are (`question_id` and whatever else identifies the question
    or the official converters read: POPE's `category`, MMBench's `round_id`/`options`); `truth` and
    `group` are the scorer's (ground truth, and what the question is reported under)."""

    fields: dict
    text: str
    image: str | bytes | None
    truth: Any = None
    group: dict = dataclasses.field(default_factory=dict)

    @property
    def question_id(self):
        return self.fields["question_id"]


def prompt_text(text: str, suffix: str) -> str:
    """The question as asked: its text, then the instruction on a line of its own (either may be empty)."""
    return "\n".join(part for part in (text.strip(), suffix.strip()) if part)


def options_text(options: Sequence[str]) -> str:
    """LLaVA's option lines: "A. first\\nB. second"."""
    return "\n".join(f"{LETTERS[i]}. {option}" for i, option in enumerate(options))


def is_missing(value) -> bool:
    """An empty cell as pandas writes it (NaN, "nan", "None", ""), as LLaVA's MMBench reader tests it."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return True
    return isinstance(value, str) and value.strip().lower() in ("", "nan", "none")


def read_json(path: str | os.PathLike, what: str) -> Any:
    """The parsed JSON file; BenchmarkError naming `what` it should be when missing or broken."""
    p = Path(path)
    if not p.is_file():
        raise BenchmarkError(f"{what} {path} does not exist" + (" (it is a directory)" if p.is_dir() else ""))
    try:
        with open(p, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise BenchmarkError(f"{what} {path} line {e.lineno}, column {e.colno}: not valid JSON ({e.msg})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BenchmarkError(f"cannot read {what} {path}: {getattr(e, 'strerror', None) or e}") from None


def read_jsonl(path: str | os.PathLike, what: str, required: Sequence[str]) -> list[dict]:
    """The records of a jsonl file, each checked to have the `required` keys (file and line named)."""
    from owl_jax.evaluate import read_jsonl as read
    if not Path(path).is_file():
        raise BenchmarkError(f"{what} {path} does not exist")
    try:
        records = read(str(path))
    except ValueError as e:
        raise BenchmarkError(str(e)) from None
    for number, r in enumerate(records, 1):
        require(r, required, f"{path} record {number}")
    return records


def require(record, keys: Sequence[str], where: str) -> None:
    """BenchmarkError unless `record` is a dict with every key of `keys`."""
    if not isinstance(record, dict):
        raise BenchmarkError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [k for k in keys if k not in record]
    if missing:
        raise BenchmarkError(f"{where} lacks {', '.join(repr(k) for k in missing)}")


def first_existing(*candidates: str | os.PathLike | None) -> str | None:
    for c in candidates:
        if c and os.path.isdir(c):
            return str(c)
    return None


def image_root(args, data_dir: str | os.PathLike, *defaults: str, what: str = "images") -> str:
    """`--image-root`, else the first of `defaults` (relative to the benchmark's folder) that exists;
    BenchmarkError naming where images were looked for."""
    if args.image_root:
        if not os.path.isdir(args.image_root):
            raise BenchmarkError(f"--image-root {args.image_root} is not a directory")
        return args.image_root
    found = first_existing(*(os.path.join(data_dir, d) for d in defaults))
    if found is None:
        tried = ", ".join(os.path.join(str(data_dir), d) for d in defaults)
        raise BenchmarkError(f"no {what} folder found (looked for {tried}); pass --image-root")
    return found


def accuracy(correct: int, count: int) -> float:
    return correct / count if count else 0.0


def percent(value: float) -> str:
    return f"{100 * value:.2f}"


def limited(items: list, limit: int) -> list:
    return items[:limit] if limit else items


class Benchmark:
    """One benchmark: its files read into questions, its scorer, its table and its official files.

    `suffix`: the instruction appended to every question (`--prompt-suffix` replaces it). `key_fields`: the
    answer-record fields that identify a question (a re-run matches answers to questions by them).
    `outputs`: the suffixes of the official files written next to the answers (`answers.jsonl` ->
    `answers<suffix>`), checked before any compute."""

    name = ""
    suffix = SHORT_ANSWER
    key_fields: tuple[str, ...] = ("question_id",)
    outputs: tuple[str, ...] = ()

    def load(self, args) -> tuple[list[Question], str | None]:
        """(questions in the benchmark's order, the folder their image paths are relative to)."""
        raise NotImplementedError

    def score(self, questions: Sequence[Question], texts: Sequence[str]) -> dict:
        raise NotImplementedError

    def table(self, scores: dict) -> tuple[list[str], list[list]]:
        """(header, rows) of the printed score table."""
        raise NotImplementedError

    def write_official(self, questions: Sequence[Question], texts: Sequence[str], stem: str) -> list[str]:
        """Write the official scorer's / leaderboard's files (paths `stem + suffix` of `outputs`)."""
        return []

    def recorded_prompt(self, question: Question, prompt: str) -> str:
        """The `prompt` of the answer record (what the question was asked with, without the template)."""
        return prompt

    def record_key(self, record: dict) -> str:
        """The key of an answer record (or of a question's `fields`) in the answers file."""
        from owl_jax.evaluate import answer_key
        if len(self.key_fields) == 1:
            return answer_key(record[self.key_fields[0]])
        return answer_key([record[f] for f in self.key_fields])
