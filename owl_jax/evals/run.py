"""A benchmark run: questions answered in batches into a resumable answers file, then scored.

`python -m owl_jax.evaluate --task BENCH --data PATH --out answers.jsonl` (see `owl_jax.evaluate`):

1. Before any compute: `--out`, the scores file and the official files next to it are checked
   (`owl_jax.answer_log.check_output_file`), the benchmark's files read (one `error:` line naming what
   is missing or malformed) and every image path checked to exist under the image root.
2. The answers file is `owl_jax.answer_log.AnswerLog`: answers already there (an interrupted run, the
   same model and prompts) are kept and not asked again; each new answer is appended and flushed as it
   is produced; the finished file is in the benchmark's order. Records are LLaVA's answers format
   (`question_id`, `prompt`, `text`, `answer_id`, `model_id`, `metadata`) plus the fields a
   benchmark's official converter reads (POPE `category`, MMBench `round_id` / `options`).
3. Questions are asked in the model's conversation template (`owl_jax.chat.ChatSession`, the template
   the checkpoint's config names), greedy unless told otherwise, `batch_size` at a time. Every row stops
   on its own budget and samples from its own stream (seeded by its key), so an answer is the same at
   every batch size (`owl_jax.generate`; tested). A question that cannot be asked (it does not fit the
   context, an unreadable image) is answered "" with the reason in `metadata.skipped`, and counted.
4. Scores: printed as a table and written to `<answers>.scores.json`; the official files beside them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
import zlib
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from owl_jax.evals.base import Benchmark, BenchmarkError, Question, prompt_text


def stem_of(out: str) -> str:
    """`answers.jsonl` -> `answers`: the name the scores and official files are derived from."""
    return out[:-len(".jsonl")] if out.endswith(".jsonl") else out


def scores_path(out: str) -> str:
    return stem_of(out) + ".scores.json"


def check_outputs(bench: Benchmark, out: str) -> None:
    """OutputError (one line) unless the answers file, the scores file and the official files can be
    written (the latter two are replaced on every run)."""
    from owl_jax.answer_log import OutputError, check_output_file
    check_output_file(out)
    for path in (scores_path(out), *(stem_of(out) + s for s in bench.outputs)):
        if path.endswith(".mme"):  # a folder of the eval tool's txt files
            if os.path.exists(path) and not os.path.isdir(path):
                raise OutputError(f"{path} (MME's results folder, next to --out) is a file")
            continue
        check_output_file(path, option="the file next to --out")


def check_images(questions: Sequence[Question], root: str | None) -> None:
    """BenchmarkError naming how many images are missing and one of them (a wrong --image-root)."""
    paths = sorted({q.image for q in questions if isinstance(q.image, str)})
    if not paths:
        return
    missing = [p for p in paths if not os.path.isfile(os.path.join(root or "", p))]
    if missing:
        raise BenchmarkError(f"{len(missing)} of {len(paths)} images are missing under {root}, e.g. "
                             f"{os.path.join(root or '', missing[0])} (--image-root?)")


def load_pixels(image: str | bytes, root: str | None, size: int) -> np.ndarray:
    """[size, size, 3] CLIP-normalised pixels of an image file (under `root`) or encoded bytes; ChatError."""
    from owl_jax.chat import ChatError, read_image
    if isinstance(image, str):
        return read_image(os.path.join(root or "", image), size)
    from data_pipelines import images as image_ops
    try:
        return image_ops.preprocess(image_ops.decode_image(image), size, train=False)
    except image_ops.BadSample as e:
        raise ChatError(f"the image is not readable ({e})") from None


class Progress:
    """`name: 120/4241 answered (3.1/s, ETA 22:10)` on stderr, at most every `every` seconds and at the end."""

    def __init__(self, name: str, total: int, done: int, *, every: float = 10.0, stream=None):
        self.name, self.total, self.done, self.every = name, total, done, every
        self.start_done, self.start = done, time.monotonic()
        self.last = self.start
        self.stream = stream or sys.stderr

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last < self.every and self.done < self.total:
            return
        self.last = now
        rate = (self.done - self.start_done) / max(now - self.start, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        print(f"{self.name}: {self.done}/{self.total} answered ({rate:.2f}/s, ETA {format_duration(eta)})",
              file=self.stream, flush=True)


def format_duration(seconds: float) -> str:
    """`1:02:03`, `2:03`, or `?` for an unknown (infinite) time."""
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def answer_record(q: Question, prompt: str, text: str, model_id: str, metadata: dict | None = None) -> dict:
    """LLaVA's answer record; `answer_id` is a hash of what it answers (stable across runs and batch sizes,
    where LLaVA's is a random uuid)."""
    digest = hashlib.sha1(json.dumps([model_id, q.fields, prompt, text], sort_keys=True).encode()).hexdigest()[:22]
    return {**q.fields, "prompt": prompt, "text": text, "answer_id": digest, "model_id": model_id,
            "metadata": metadata or {}}


def generate_answers(cfg, model, tokenizer, questions: Sequence[Question], prompts: Sequence[str], root: str | None,
                     settings, *, keys: Sequence[str], batch_size: int = 8, generator=None,
                     on_answer: Callable[[int, str, dict], None], progress: Progress | None = None) -> int:
    """Answer `questions[i]` with `prompts[i]`, `batch_size` per generation batch, calling
    `on_answer(i, text, metadata)` as each answer exists. Returns the number of skipped questions."""
    from owl_jax.chat import ChatError, ChatSession, clean_answer
    from owl_jax.evaluate import _generator
    generator = _generator(cfg, model, tokenizer, generator)
    size = cfg.model.vision.image_size
    skipped = 0
    order = list(range(len(questions)))
    for start in range(0, len(order), batch_size):
        group, built = order[start:start + batch_size], []
        for i in group:
            session = ChatSession.for_config(cfg, tokenizer)
            try:
                if questions[i].image is not None:
                    session.add_image(load_pixels(questions[i].image, root, size))
                prompt = session.prompt(prompts[i], max_new_tokens=settings.max_new_tokens)
            except ChatError as e:  # counted and recorded, the run goes on
                skipped += 1
                on_answer(i, "", {"skipped": str(e)})
                continue
            built.append((i, dataclasses.replace(prompt, seed=zlib.crc32(keys[i].encode()))))
        if built:
            for (i, _), gen in zip(built, generator.generate([p for _, p in built], settings)):
                on_answer(i, clean_answer(gen.text, cfg.data.template), {})
        if progress is not None:
            progress.update(len(group))
    return skipped


def _resumable(log, bench: Benchmark, questions, prompts, keys, model_id: str) -> dict[str, dict]:
    """The earlier run's records in `log` that belong to this evaluation (the same questions, model_id and
    recorded prompts, `Benchmark.recorded_prompt`); OutputError otherwise."""
    from owl_jax.answer_log import OutputError
    index = {k: i for i, k in enumerate(keys)}
    log.check_belongs(index, model_id, f"these {bench.name} questions")
    for key, r in log.done.items():
        if r.get("prompt") != prompts[index[key]]:
            raise OutputError(f"{log.path}: the answer to {key} was asked with another prompt (another "
                              "--prompt-suffix?); choose another --out or delete it")
        if not isinstance(r.get("text"), str):
            raise OutputError(f"{log.path}: the answer to {key} has no text")
    return dict(log.done)


def run_benchmark(args, load_model: Callable, settings) -> int:
    """The `--task BENCH` command (see the module docstring); `load_model()` -> (cfg, model, tokenizer)."""
    from owl_jax.answer_log import AnswerLog
    from owl_jax.evals import benchmark
    from owl_jax.loading import model_name
    bench = benchmark(args.task)
    if not args.data:
        raise BenchmarkError(f"--task {args.task} needs --data (the benchmark's files; see docs/evaluation.md)")
    if not args.out:
        raise BenchmarkError(f"--task {args.task} needs --out (the answers file, e.g. {args.task}_answers.jsonl)")
    if args.batch_size < 1:
        raise BenchmarkError(f"--batch-size must be at least 1, got {args.batch_size}")
    check_outputs(bench, args.out)
    questions, root = bench.load(args)
    if not questions:
        raise BenchmarkError(f"no {bench.name} questions in {args.data}")
    keys = [bench.record_key(q.fields) for q in questions]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise BenchmarkError(f"{args.data}: question {dup} occurs twice")
    check_images(questions, root)
    suffix = bench.suffix if args.prompt_suffix is None else args.prompt_suffix
    prompts = [prompt_text(q.text, suffix) for q in questions]
    recorded = [bench.recorded_prompt(q, p) for q, p in zip(questions, prompts)]
    model_id = args.model_id or model_name(args.checkpoint)
    skipped = 0
    with AnswerLog(args.out, key=bench.record_key) as log:
        earlier = _resumable(log, bench, questions, recorded, keys, model_id)
        todo = [i for i, k in enumerate(keys) if k not in earlier]
        if todo:
            if earlier:
                partial = " (its truncated last line dropped)" if log.dropped_partial else ""
                print(f"resuming: {len(earlier)} of {len(questions)} answers already in {args.out}{partial}",
                      file=sys.stderr)
            cfg, model, tokenizer = load_model()
            if getattr(args, "stop", None) is None:  # the model's conversation template decides where to stop
                from owl_jax.chat import stop_strings
                settings = dataclasses.replace(settings, stop_strings=stop_strings(cfg))
            progress = Progress(bench.name, len(questions), len(earlier))

            def write(j: int, text: str, metadata: dict) -> None:
                i = todo[j]
                log.write(answer_record(questions[i], recorded[i], text, model_id, metadata))

            try:
                skipped = generate_answers(cfg, model, tokenizer, [questions[i] for i in todo],
                                           [prompts[i] for i in todo], root, settings, keys=[keys[i] for i in todo],
                                           batch_size=args.batch_size, on_answer=write, progress=progress)
            except KeyboardInterrupt:
                print(f"interrupted: {len(log.done)} of {len(questions)} answers are in {args.out}; the same "
                      "command resumes", file=sys.stderr)
                return 130
        log.finish([log.done[k] for k in keys])
        texts = [log.done[k]["text"] for k in keys]
    new = len(todo)
    if not new:
        print(f"all {len(questions)} answers are already in {args.out} (nothing to generate)")
    else:
        print(f"wrote {len(questions)} answers to {args.out}" +
              (f" ({new} new, {len(earlier)} from an earlier run)" if earlier else ""))
    if skipped:
        print(f"warning: {skipped} questions could not be asked (answered empty; see metadata.skipped in {args.out})",
              file=sys.stderr)
    scores = bench.score(questions, texts)
    header, rows = bench.table(scores)
    print(format_table(f"{bench.name} ({len(questions)} questions, model {model_id})", header, rows))
    stem = stem_of(args.out)
    official = bench.write_official(questions, texts, stem)
    skipped_total = sum(isinstance(m := log.done[k].get("metadata"), dict) and bool(m.get("skipped")) for k in keys)
    summary = {"benchmark": bench.name, "model_id": model_id, "answers": str(args.out), "questions": len(questions),
               "prompt_suffix": suffix, "skipped": skipped_total, "scores": scores, "official_files": official}
    Path(scores_path(args.out)).write_text(json.dumps(summary, indent=2, default=_json_default) + "\n",
                                           encoding="utf-8")
    print(f"scores: {scores_path(args.out)}" + (f"; for the official tools: {', '.join(official)}" if official else ""))
    return 0


def _json_default(value):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def format_table(title: str, header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A plain-text table: the title, the header, the rows; columns right-aligned but the first."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[j]) for r in cells if j < len(r)) for j in range(len(header))]
    lines = [title]
    for n, row in enumerate(cells):
        lines.append("  ".join(c.ljust(widths[j]) if j == 0 else c.rjust(widths[j]) for j, c in enumerate(row)))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
