"""Evaluation without exporting: VQA (multiple choice or generated answers), caption matching, caption
perplexity, and OwlEval-format answers.

`python -m owl_jax.evaluate --checkpoint RUN_DIR --task vqa --questions eval.jsonl --image-root DIR`

`--checkpoint` is a training run or a Hugging Face directory (see `owl_jax.loading`).

- `--task vqa` (`{"image", "question", "answer", "choices", "kind"}`): each question is asked in the official
  conversation template. `--vqa-mode choice` (default) scores every candidate answer by its mean token
  negative log-likelihood and predicts the best one; accuracy per `kind` next to chance (1 / number of
  choices). Scoring keeps the metric exact for short answers and cheap on a CPU. `--vqa-mode generate`
  generates a short answer (greedy by default) and reports exact-match accuracy after normalisation
  (lower case, punctuation and extra spaces removed).
- `--task captions` (`{"image", "caption", "description"}`): pick each picture's caption among 5.
- `--task caption_ppl --shards PATTERN ...` (default `data.eval_paths`): perplexity of held-out captions,
  read by the caption pipeline in eval mode (no augmentation, no shuffling) with the run's caption
  template; per caption token and EOS, as the training loss counts them.
- `--task owleval --questions questions.jsonl --out answers.jsonl`: OwlEval format. Questions on the same
  image form one dialogue, answered in `question_id` order with the earlier questions and answers as
  history; writes `{"image", "question_id", "question", "answer", "model_id"}` per question. Each answer
  stops on its own budget (the room its prompt leaves), so answers do not depend on the batch size or on
  which other questions are asked. `--out` is checked before the model loads (`owl_jax.answer_log`);
  answers are appended to it (one flushed line each) as they are produced, a re-run with the same `--out`
  asks only the questions not answered there yet (a truncated last line is asked again), and the finished
  file is in input order. `model_id` defaults to the checkpoint's name (`RUN-stepN` for
  `RUN/checkpoints/N`).

The standard benchmarks, each from its own published files (`owl_jax.evals`; docs/evaluation.md):

    python -m owl_jax.evaluate --task BENCH --checkpoint DIR --data PATH [--image-root DIR] --out answers.jsonl
        [--limit N] [--batch-size B] [--prompt-suffix TEXT]

with BENCH one of pope, scienceqa, mme, textvqa, vqav2, gqa, seed, mmbench, coco. Answers are
generated greedily (128 new tokens at most unless `--max-new-tokens`) in the model's conversation
template with the peers' instruction after the question (`--prompt-suffix` replaces it), written as
they are produced and resumed like OwlEval's (`owl_jax.evals.run`); the scores are printed as a table
and written to `answers.scores.json`, the files the official scorers take next to them.

Every user mistake (a missing or broken questions or benchmark file, with its line number; a bad
`--out`; images missing under `--image-root`) is one `error:` line and exit status 2, before any compute.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import json
import math
import os
import re
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from owl_jax.config import Config


def _choice_batch(cfg: Config, tokenizer, question: str, choices: Sequence[str], pixels: np.ndarray | None):
    from data_pipelines.conversation import make_conversation
    from data_pipelines.packing import pad_batch
    from data_pipelines.tokenize import to_training_sample
    from owl_jax.chat import system_prompt, template_for
    from owl_jax.models.splice import plan_image_slots
    tpi = cfg.model.tokens_per_image
    system, template = system_prompt(cfg), template_for(cfg)  # the model's own conversation template
    samples = []
    for choice in choices:
        turns = ([("human", "<image>")] if pixels is not None else []) + [("human", question), ("ai", choice)]
        conv = make_conversation(turns, images=["image"] if pixels is not None else [], system=system,
                                 markers=template.markers)
        samples.append(to_training_sample(conv, tokenizer, cfg.data.seq_len, tpi, images=conv.images,
                                          template=template))
    packed = pad_batch(samples, cfg.data.seq_len, pad_id=tokenizer.pad_id)
    batch = {k: np.asarray(v) for k, v in packed.arrays.items()}
    if pixels is not None:
        n = len(choices)
        batch["pixel_values"] = np.repeat(pixels[None], n, axis=0)
        batch["image_index"] = plan_image_slots(batch["tokens"], np.ones(n, np.int64), tokens_per_image=tpi,
                                                image_budget=n)
    return batch


def _row_scores_fn(graphdef):
    @jax.jit
    def scores(state, batch):
        from owl_jax.loss import token_nll
        model = nnx.merge(graphdef, state)
        hidden = model(batch["tokens"], positions=batch.get("positions"), segment_ids=batch.get("segment_ids"),
                       pixel_values=batch.get("pixel_values"), image_index=batch.get("image_index"))
        nll = token_nll(hidden, model.language_model.output_kernel(), batch["targets"])
        mask = batch["loss_mask"].astype(jnp.float32)
        return (nll * mask).sum(-1) / jnp.maximum(mask.sum(-1), 1.0)
    return scores


def load_image(path: str, size: int) -> np.ndarray:
    from data_pipelines import images as image_ops
    with open(path, "rb") as f:
        image = image_ops.decode_image(f.read())
    return image_ops.preprocess(image, size, train=False)


def multiple_choice_accuracy(cfg: Config, model, tokenizer, questions: list[dict], image_root: str) -> dict:
    """{kind: {"accuracy", "chance", "count"}} plus an "all" entry."""
    model.eval()
    graphdef, state = nnx.split(model)
    scores_fn = _row_scores_fn(graphdef)
    correct, chance, count = collections.Counter(), collections.Counter(), collections.Counter()
    for q in questions:
        pixels = None
        if q.get("image"):
            pixels = load_image(os.path.join(image_root, q["image"]), cfg.model.vision.image_size)
        choices = list(q["choices"])
        batch = _choice_batch(cfg, tokenizer, q["question"], choices, pixels)
        scores = np.asarray(scores_fn(state, batch))
        predicted = choices[int(np.argmin(scores))]
        for kind in (q.get("kind", "all"), "all") if q.get("kind", "all") != "all" else ("all",):
            correct[kind] += int(predicted.strip().lower() == q["answer"].strip().lower())
            chance[kind] += 1.0 / len(choices)
            count[kind] += 1
    return {k: {"accuracy": correct[k] / count[k], "chance": chance[k] / count[k], "count": count[k]}
            for k in count}


def _caption_batch(cfg: Config, tokenizer, captions: Sequence[str], pixels: np.ndarray):
    from data_pipelines.captions import CaptionTokenizer
    from owl_jax.models.splice import plan_image_slots
    tpi, t, n = cfg.model.tokens_per_image, cfg.data.seq_len, len(captions)
    encode = CaptionTokenizer(tokenizer, cfg.data.caption_template, tpi)
    tokens = np.full((n, t), tokenizer.pad_id, np.int64)
    weighted = np.zeros((n, t), bool)
    for i, c in enumerate(captions):
        tok, w = encode(c, t)
        tokens[i, :len(tok)], weighted[i, :len(tok)] = tok, w
    return {"tokens": tokens.astype(np.int32),
            "targets": np.maximum(np.concatenate([tokens[:, 1:], np.zeros((n, 1), np.int64)], 1), 0).astype(np.int32),
            "loss_mask": np.concatenate([weighted[:, 1:], np.zeros((n, 1), bool)], 1),
            "pixel_values": np.repeat(pixels[None], n, axis=0),
            "image_index": plan_image_slots(tokens, np.ones(n, np.int64), tokens_per_image=tpi, image_budget=n)}


def caption_matching_accuracy(cfg: Config, model, tokenizer, records: list[dict], image_root: str, *,
                              num_choices: int = 5, seed: int = 0) -> dict:
    """Pick each picture's caption among `num_choices` (its own + captions of pictures with another
    description) by caption likelihood under the stage-1 template."""
    model.eval()
    graphdef, state = nnx.split(model)
    scores_fn = _row_scores_fn(graphdef)
    rng = np.random.default_rng(seed)
    correct = 0
    for i, r in enumerate(records):
        others = [o["caption"] for o in records if o.get("description", o["caption"]) != r.get("description", r["caption"])]
        distractors = [others[j] for j in rng.choice(len(others), size=num_choices - 1, replace=False)]
        candidates = [r["caption"], *distractors]
        pixels = load_image(os.path.join(image_root, r["image"]), cfg.model.vision.image_size)
        scores = np.asarray(scores_fn(state, _caption_batch(cfg, tokenizer, candidates, pixels)))
        correct += int(np.argmin(scores) == 0)
    return {"captions": {"accuracy": correct / len(records), "chance": 1.0 / num_choices, "count": len(records)}}


def _generator(cfg: Config, model, tokenizer, generator=None):
    from owl_jax.generate import Generator
    return generator or Generator(model, tokenizer, tokens_per_image=cfg.model.tokens_per_image,
                                  image_size=cfg.model.vision.image_size)


def normalize_answer(text: str) -> str:
    """Lower case, punctuation removed, spaces collapsed: "On the left." == "on the left"."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def generated_answer_accuracy(cfg: Config, model, tokenizer, questions: list[dict], image_root: str, *,
                              settings=None, batch_size: int = 8, generator=None) -> dict:
    """Exact-match accuracy of generated short answers (greedy, 16 new tokens unless `settings` say
    otherwise), per `kind` like `multiple_choice_accuracy`; chance is 1 / number of choices when the
    records carry choices (0 otherwise)."""
    from owl_jax.chat import ChatSession, read_image
    from owl_jax.generate import GenerationSettings
    settings = settings or GenerationSettings(max_new_tokens=16)
    generator = _generator(cfg, model, tokenizer, generator)
    correct, chance, count = collections.Counter(), collections.Counter(), collections.Counter()
    for start in range(0, len(questions), batch_size):
        group = questions[start:start + batch_size]
        sessions = [ChatSession.for_config(cfg, tokenizer) for _ in group]
        for q, session in zip(group, sessions):
            if q.get("image"):
                session.add_image(read_image(os.path.join(image_root, q["image"]), cfg.model.vision.image_size))
        prompts = [dataclasses.replace(s.prompt(q["question"], max_new_tokens=settings.max_new_tokens),
                                       seed=start + i) for i, (q, s) in enumerate(zip(group, sessions))]
        for q, session, gen in zip(group, sessions, generator.generate(prompts, settings)):
            answer = session.record(q["question"], gen.text)
            kind = q.get("kind", "all")
            for k in (kind, "all") if kind != "all" else ("all",):
                correct[k] += int(normalize_answer(answer) == normalize_answer(q["answer"]))
                chance[k] += 1.0 / len(q["choices"]) if q.get("choices") else 0.0
                count[k] += 1
    return {k: {"accuracy": correct[k] / count[k], "chance": chance[k] / count[k], "count": count[k]}
            for k in count}


def _natural_key(value) -> tuple:
    """Sort key for question ids: 2 < 10, "3-2" < "3-10", numbers and strings mixed."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", str(value)) if p)


def answer_key(question_id) -> str:
    """The key of a question in an answers file: its id as JSON (7 and "7" are different questions)."""
    return json.dumps(question_id, sort_keys=True)


def check_owleval_questions(questions: list[dict]) -> None:
    """ValueError (one line) for a record that is not an OwlEval question, or a question_id used twice
    (answers are matched to questions by id, e.g. when a run resumes)."""
    first: dict[str, int] = {}
    for i, q in enumerate(questions, 1):
        missing = [k for k in ("question_id", "question") if k not in q]
        if missing:
            raise ValueError(f"question {i} lacks {', '.join(missing)} (OwlEval format: image, question_id, question)")
        key = answer_key(q["question_id"])
        if key in first:
            raise ValueError(f"questions {first[key]} and {i} have the same question_id {key}")
        first[key] = i


def owleval_answers(cfg: Config, model, tokenizer, questions: list[dict], image_root: str, *, settings=None,
                    model_id: str = "owl-jax", batch_size: int = 8, generator=None,
                    answered: dict[str, str] | None = None, on_answer=None) -> list[dict]:
    """Answers in the OwlEval format (see the module docstring), in input order.

    Dialogues are answered round by round, the r-th question of up to `batch_size` dialogues per
    generation batch; every row stops on its own budget (the room its own prompt leaves in the context)
    and samples from its own stream (seeded by its question_id), so an answer is the same at every batch
    size and in every subset of the questions. `answered` ({answer_key(question_id): answer}, e.g. from
    an interrupted run's file) are not asked again: they enter their dialogue's history as they were
    given. `on_answer(record)` is called with each new answer as soon as it exists."""
    import zlib
    from owl_jax.chat import ChatSession, read_image, stop_strings
    from owl_jax.generate import GenerationSettings
    settings = settings or GenerationSettings(max_new_tokens=512, stop_strings=stop_strings(cfg))
    answered = dict(answered or {})
    check_owleval_questions(questions)

    def record(q: dict, answer: str) -> dict:
        return {"image": q.get("image"), "question_id": q["question_id"], "question": q["question"],
                "answer": answer, "model_id": model_id}

    dialogues: dict[str, list[dict]] = collections.defaultdict(list)
    for q in questions:
        dialogues[q.get("image") or ""].append(q)
    # a dialogue whose questions are all answered needs neither its image nor a session
    dialogues = {image: qs for image, qs in dialogues.items()
                 if any(answer_key(q["question_id"]) not in answered for q in qs)}
    sessions = {}
    if dialogues:
        generator = _generator(cfg, model, tokenizer, generator)
    for image, qs in dialogues.items():
        qs.sort(key=lambda q: _natural_key(q["question_id"]))
        sessions[image] = ChatSession.for_config(cfg, tokenizer)
        if image:
            sessions[image].add_image(read_image(os.path.join(image_root, image), cfg.model.vision.image_size))
    for r in range(max((len(qs) for qs in dialogues.values()), default=0)):
        active = []
        for image, qs in dialogues.items():
            if len(qs) <= r:
                continue
            q = qs[r]
            key = answer_key(q["question_id"])
            if key in answered:  # an earlier run's answer: history, not a question to ask
                sessions[image].record(q["question"], answered[key])
            else:
                active.append((image, q))
        for start in range(0, len(active), batch_size):
            group = active[start:start + batch_size]
            prompts = [dataclasses.replace(
                sessions[image].prompt(q["question"], max_new_tokens=settings.max_new_tokens),
                seed=zlib.crc32(answer_key(q["question_id"]).encode())) for image, q in group]
            for (image, q), gen in zip(group, generator.generate(prompts, settings)):
                answer = sessions[image].record(q["question"], gen.text)
                answered[answer_key(q["question_id"])] = answer
                if on_answer is not None:
                    on_answer(record(q, answer))
    return [record(q, answered[answer_key(q["question_id"])]) for q in questions]


@functools.lru_cache(maxsize=8)
def _row_sums_fn(graphdef):
    """Jitted per-row (NLL sum, token count); cached per architecture so repeated calls do not recompile."""
    @jax.jit
    def sums(state, batch):
        from owl_jax.loss import token_nll
        model = nnx.merge(graphdef, state)
        hidden = model(batch["tokens"], pixel_values=batch["pixel_values"], image_index=batch["image_index"])
        nll = token_nll(hidden, model.language_model.output_kernel(), batch["targets"])
        mask = batch["loss_mask"].astype(jnp.float32)
        return (nll * mask).sum(-1), mask.sum(-1)
    return sums


def caption_perplexity(cfg: Config, model, tokenizer, shards: Sequence[str], *, batch_size: int = 8,
                       limit: int = 0) -> dict:
    """{"perplexity", "nll" (mean per token), "tokens", "samples"} of the captions in `shards`, one pass,
    batches of `batch_size` (the last one filled with rows that count nothing, so one compile)."""
    from data_pipelines.captions import CaptionPipeline
    from owl_jax.models.splice import plan_image_slots
    tpi, t, size = cfg.model.tokens_per_image, cfg.data.seq_len, cfg.model.vision.image_size
    pipeline = CaptionPipeline(list(shards), tokenizer=tokenizer, seq_len=t, rows=1, image_budget=1, image_size=size,
                               tokens_per_image=tpi, template=cfg.data.caption_template, shuffle=False,
                               train=False, num_workers=0, epochs=1)
    model.eval()
    graphdef, state = nnx.split(model)
    sums_fn = _row_sums_fn(graphdef)
    total, tokens_counted, samples, exhausted = 0.0, 0.0, 0, False
    try:
        while not exhausted and not (limit and samples >= limit):
            tokens = np.full((batch_size, t), tokenizer.pad_id, np.int64)
            tokens[:, 0] = 0  # filler rows: one text token, no image, nothing counted
            weighted = np.zeros((batch_size, t), bool)
            pixels = np.zeros((batch_size, size, size, 3), np.float32)
            images = np.zeros(batch_size, np.int64)
            n = 0
            while n < batch_size and not (limit and samples + n >= limit):
                try:
                    _, px, tok, w = pipeline.next_sample()
                except StopIteration:
                    exhausted = True
                    break
                tokens[n], weighted[n] = tokenizer.pad_id, False
                tokens[n, :len(tok)], weighted[n, :len(tok)], pixels[n], images[n] = tok, w, px, 1
                n += 1
            if not n:
                break
            batch = {"tokens": tokens.astype(np.int32),
                     "targets": np.maximum(np.concatenate([tokens[:, 1:], np.zeros((batch_size, 1), np.int64)], 1),
                                           0).astype(np.int32),
                     "loss_mask": np.concatenate([weighted[:, 1:], np.zeros((batch_size, 1), bool)], 1),
                     "pixel_values": pixels,
                     "image_index": plan_image_slots(tokens, images, tokens_per_image=tpi, image_budget=batch_size)}
            nll, count = sums_fn(state, batch)
            total += float(np.sum(nll))
            tokens_counted += float(np.sum(count))
            samples += n
    finally:
        pipeline.close()
    if not samples:
        raise ValueError(f"no captions in {list(shards)}")
    mean = total / max(tokens_counted, 1.0)
    return {"perplexity": math.exp(mean), "nll": mean, "tokens": int(tokens_counted), "samples": samples}


def load_model_for_eval(checkpoint: str, **kwargs):
    """(config, model, tokenizer) from a training run directory (latest step), one step directory or a
    Hugging Face directory; keyword arguments go to `owl_jax.loading.load_for_inference`."""
    from owl_jax.loading import load_for_inference
    loaded = load_for_inference(checkpoint, **kwargs)
    return loaded.config, loaded.model, loaded.tokenizer


def read_jsonl(path: str, limit: int = 0) -> list[dict]:
    """The records of a jsonl file (blank lines skipped), the first `limit` if set; ValueError (one line)
    for a missing or unreadable file, and for a line that is not a JSON object, naming the file's own line
    number (1-based, blank lines counted; the JSON decoder's own line is always 1) and the column."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = list(f)  # split at line ends only (str.splitlines would also split at U+2028, ...)
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {number}, column {e.colno}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path} line {number}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
        if limit and len(records) >= limit:
            break
    return records


def main(argv: Sequence[str] | None = None) -> int:
    from owl_jax.generate import add_generation_arguments, add_model_arguments
    parser = argparse.ArgumentParser(prog="python -m owl_jax.evaluate", description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    from owl_jax.evals import NAMES
    parser.add_argument("--task", choices=["vqa", "captions", "caption_ppl", "owleval", *NAMES], default="vqa")
    parser.add_argument("--questions",
                        help="jsonl: vqa {image, question, answer, choices, kind}; captions {image, caption}; "
                             "owleval {image, question_id, question}")
    parser.add_argument("--vqa-mode", choices=["choice", "generate"], default="choice",
                        help="vqa: score the choices (default) or generate an answer (exact match)")
    parser.add_argument("--shards", nargs="+", help="caption_ppl: caption shards (default: the run's data.eval_paths)")
    parser.add_argument("--data", help="benchmarks: the benchmark's file or folder (docs/evaluation.md)")
    parser.add_argument("--annotations", help="vqav2: the annotations json (default: found next to --data by its name)")
    parser.add_argument("--split", help="scienceqa: the pid_splits.json split (test); coco: the Karpathy split (test)")
    parser.add_argument("--prompt-suffix", default=None,
                        help="benchmarks: the instruction after each question, instead of the peers' ('' for none)")
    parser.add_argument("--caption-tokenizer", choices=["auto", "ptb", "python"], default="auto",
                        help="coco: PTB (pycocoevalcap's Java tokenizer), the pure-Python one, or PTB when available")
    parser.add_argument("--out", help="owleval and benchmarks: answers jsonl, written as answers are produced; a "
                                      "re-run with the same --out answers only the questions not in it yet")
    parser.add_argument("--model-id", help="owleval and benchmarks: model_id of the answers (default: the "
                                           "checkpoint's name, RUN-stepN for RUN/checkpoints/N)")
    parser.add_argument("--image-root", default="")
    parser.add_argument("--limit", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    add_generation_arguments(parser, max_new_tokens=0)
    args = parser.parse_args(argv)
    from data_pipelines.captions import DataError
    from owl_jax.loading import LoadError
    try:
        return _run(args)
    except (LoadError, DataError, FileNotFoundError, ValueError) as e:  # user mistakes: one line, exit 2
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2


def _answer_tasks() -> tuple[str, ...]:
    """Tasks that write answers (`--out`), and so check it before anything else and resume from it."""
    from owl_jax.evals import NAMES
    return ("owleval", *NAMES)


ANSWER_TASKS = _answer_tasks()


def _run(args) -> int:
    from owl_jax.evals import NAMES
    from owl_jax.generate import settings_from_args
    if args.task in NAMES:
        from owl_jax.evals.run import run_benchmark
        if args.questions:
            raise ValueError(f"--task {args.task} reads the benchmark's own files (--data), not --questions")
        settings = settings_from_args(args)
        settings = dataclasses.replace(settings, max_new_tokens=args.max_new_tokens or 128)
        return run_benchmark(args, lambda: _load_for_args(args), settings)
    if args.data:
        raise ValueError(f"--data is for the benchmark tasks ({', '.join(NAMES)}); --task {args.task} reads --questions")
    # Everything a user can get wrong about the files is checked before the model is loaded.
    if args.task != "caption_ppl" and not args.questions:
        raise ValueError(f"--task {args.task} needs --questions")
    if args.task in ANSWER_TASKS and not args.out:
        raise ValueError(f"--task {args.task} needs --out (the answers file)")
    if args.out and args.task not in ANSWER_TASKS:
        raise ValueError(f"--out is for the tasks that write answers ({', '.join(ANSWER_TASKS)}); "
                         f"--task {args.task} prints its scores")
    settings = settings_from_args(args)
    default_new = {"owleval": 512, "vqa": 16}.get(args.task, 0)
    settings = dataclasses.replace(settings, max_new_tokens=args.max_new_tokens or default_new)
    if args.task in ANSWER_TASKS:
        from owl_jax.answer_log import check_output_file
        check_output_file(args.out)
    questions = read_jsonl(args.questions, args.limit) if args.questions else []
    if args.task == "owleval":
        return _run_owleval(args, questions, settings)
    cfg, model, tokenizer = _load_for_args(args)
    settings = _template_stops(settings, cfg, args)
    if args.task == "caption_ppl":
        shards = args.shards or cfg.data.eval_paths
        if not shards:
            raise ValueError("--task caption_ppl needs --shards (the run has no data.eval_paths)")
        r = caption_perplexity(cfg, model, tokenizer, shards, batch_size=args.batch_size, limit=args.limit)
        print(f"caption perplexity {r['perplexity']:.3f} (mean NLL {r['nll']:.4f} over {r['tokens']} tokens of "
              f"{r['samples']} captions)")
        return 0
    if args.task == "vqa" and args.vqa_mode == "generate":
        results = generated_answer_accuracy(cfg, model, tokenizer, questions, args.image_root, settings=settings,
                                            batch_size=args.batch_size)
        label = "exact match"
    elif args.task == "vqa":
        results, label = multiple_choice_accuracy(cfg, model, tokenizer, questions, args.image_root), "accuracy"
    else:
        results, label = caption_matching_accuracy(cfg, model, tokenizer, questions, args.image_root), "accuracy"
    for kind, r in sorted(results.items()):
        print(f"{kind:>10}: {label} {100 * r['accuracy']:5.1f}%  (chance {100 * r['chance']:4.1f}%, "
              f"{r['count']} questions)")
    return 0


def _load_for_args(args):
    from owl_jax.chat import newline_warning
    cfg, model, tokenizer = load_model_for_eval(args.checkpoint, tokenizer=args.tokenizer, lora=args.lora,
                                                merge_lora=args.merge_lora, scan_layers=args.scan_layers,
                                                qformer_tokenizer=args.qformer_tokenizer)
    if args.system_prompt is not None:
        cfg.data.system_prompt = args.system_prompt
    if args.task in ("vqa", *ANSWER_TASKS) and (warning := newline_warning(tokenizer)) is not None:
        print(f"warning: {warning}", file=sys.stderr)  # the conversation template has line breaks
    return cfg, model, tokenizer


def _template_stops(settings, cfg: Config, args):
    """`settings` stopping at the model's conversation template's stop strings unless --stop gave some."""
    from owl_jax.chat import stop_strings
    return settings if args.stop is not None else dataclasses.replace(settings, stop_strings=stop_strings(cfg))


def _run_owleval(args, questions: list[dict], settings) -> int:
    """OwlEval answers into `--out`: the file checked and the earlier run's answers read before the model
    loads, each new answer appended as it is produced, the file put in question order at the end."""
    from owl_jax.answer_log import AnswerLog
    from owl_jax.loading import model_name
    check_owleval_questions(questions)
    model_id = args.model_id or model_name(args.checkpoint)
    with AnswerLog(args.out, key=lambda r: answer_key(r["question_id"])) as log:
        answered = _resumable(log, questions, model_id)
        if len(answered) < len(questions):
            if answered:
                partial = " (its truncated last line dropped)" if log.dropped_partial else ""
                print(f"resuming: {len(answered)} of {len(questions)} answers already in {args.out}{partial}",
                      file=sys.stderr)
            cfg, model, tokenizer = _load_for_args(args)
            settings = _template_stops(settings, cfg, args)
            try:
                owleval_answers(cfg, model, tokenizer, questions, args.image_root, settings=settings,
                                model_id=model_id, batch_size=args.batch_size, answered=answered,
                                on_answer=log.write)
            except KeyboardInterrupt:
                print(f"interrupted: {len(log.done)} of {len(questions)} answers are in {args.out}; the same "
                      "command resumes", file=sys.stderr)
                return 130
        log.finish(_in_order(questions, log))
    new = len(questions) - len(answered)
    if not new:
        print(f"all {len(questions)} answers are already in {args.out} (nothing to do)")
    else:
        print(f"wrote {len(questions)} answers to {args.out}"
              + (f" ({new} new, {len(answered)} from an earlier run)" if answered else ""))
    return 0


def _resumable(log, questions: list[dict], model_id: str) -> dict[str, str]:
    """{answer_key: answer} of the answers an earlier run left in `log`, after checking that they belong to
    this evaluation (the same questions and model_id); ValueError otherwise (nothing is overwritten)."""
    from owl_jax.answer_log import OutputError
    log.check_belongs({answer_key(q["question_id"]) for q in questions}, model_id)
    answered = {}
    for key, r in log.done.items():
        if not isinstance(r.get("answer"), str):
            raise OutputError(f"{log.path}: the answer to question_id {key} is not a string")
        answered[key] = r["answer"]
    return answered


def _in_order(questions: list[dict], log) -> list[dict]:
    return [log.done[answer_key(q["question_id"])] for q in questions]


if __name__ == "__main__":
    sys.exit(main())
