"""Open-ended VQA scored by VQA accuracy: TextVQA and VQAv2 (and any question file with 10 answers).

- `textvqa`: `TextVQA_0.5.1_val.json` (textvqa.org; `{"data": [{"question_id", "question", "image_id",
  "answers" (10)}]}`), images `train_images/<image_id>.jpg` (`--image-root`, default
  `DATA_DIR/train_images`). LLaVA-1.5 also gives the model OCR tokens (a separate Rosetta file); we ask
  the question alone, as without OCR input.
- `vqav2`: the official pair `v2_OpenEnded_mscoco_<subtype>_questions.json` (`--data`) and
  `v2_mscoco_<subtype>_annotations.json` (`--annotations`, default: found by that name next to the
  questions), images `<subtype>/COCO_<subtype>_<image_id:012d>.jpg`; or a jsonl of `{"question_id",
  "image", "question", "answers"}` (answers as strings or `{"answer"}` objects). test-dev has no public
  answers: it is scored by the EvalAI server (out of scope here).

The score of an answer is `owl_jax.evals.normalize.vqa_accuracy` against the human answers; VQAv2 also
per answer type (yes/no, number, other) as the official evaluation reports. `write_official` writes
the EvalAI submission (`[{"question_id", "answer"}]`, answers normalised as LLaVA's
`convert_vqav2_for_submission.py` does).
"""

from __future__ import annotations

import json
from pathlib import Path

from owl_jax.evals.base import (SHORT_ANSWER, Benchmark, BenchmarkError, Question, image_root, read_json, read_jsonl,
                                require)
from owl_jax.evals.normalize import normalize_answer, vqa_accuracy


def _answers(raw, where: str) -> list[str]:
    if not isinstance(raw, list) or not raw:
        raise BenchmarkError(f"{where}: answers must be a non-empty list")
    return [a["answer"] if isinstance(a, dict) and "answer" in a else str(a) for a in raw]


class _VQA(Benchmark):
    suffix = SHORT_ANSWER
    outputs = (".submission.json",)

    def score(self, questions, texts):
        total: dict[str, list[float]] = {}
        for q, text in zip(questions, texts):
            value = vqa_accuracy(text, q.truth)
            for g in ("overall", *([q.group["type"]] if q.group.get("type") else [])):
                total.setdefault(g, []).append(value)
        return {g: {"accuracy": sum(v) / len(v), "count": len(v)} for g, v in total.items()}

    def table(self, scores):
        return ["", "VQA accuracy", "questions"], [[g, f"{100 * s['accuracy']:.2f}", s["count"]]
                                                   for g, s in scores.items()]

    def write_official(self, questions, texts, stem):
        path = stem + ".submission.json"
        with open(path, "w", encoding="utf-8") as f:
            json.dump([{"question_id": q.question_id, "answer": normalize_answer(t)}
                       for q, t in zip(questions, texts)], f)
        return [path]


class TextVQA(_VQA):
    name = "textvqa"

    def load(self, args):
        path = Path(args.data)
        data = read_json(path, "TextVQA file")
        if not isinstance(data, dict) or not isinstance(data.get("data"), list):
            raise BenchmarkError(f"{path} is not a TextVQA file (no 'data' list)")
        records = data["data"][:args.limit] if args.limit else data["data"]
        questions = []
        for i, r in enumerate(records):
            require(r, ("question_id", "question", "image_id", "answers"), f"{path} data[{i}]")
            questions.append(Question({"question_id": r["question_id"]}, r["question"], f"{r['image_id']}.jpg",
                                      truth=_answers(r["answers"], f"{path} data[{i}]")))
        return questions, image_root(args, path.parent, "train_images", "train_val_images/train_images", "images")


class VQAv2(_VQA):
    name = "vqav2"

    def load(self, args):
        path = Path(args.data)
        if path.suffix == ".jsonl":
            records = read_jsonl(path, "VQA question file", ("question_id", "image", "answers"))
            records = records[:args.limit] if args.limit else records
            questions = []
            for i, r in enumerate(records, 1):
                if "question" not in r and "text" not in r:
                    raise BenchmarkError(f"{path} record {i} lacks 'question'")
                questions.append(Question({"question_id": r["question_id"]}, r.get("question", r.get("text")),
                                          r["image"], truth=_answers(r["answers"], f"{path} record {i}"),
                                          group={"type": r.get("answer_type")}))
            return questions, image_root(args, path.parent, "images", ".")
        data = read_json(path, "VQAv2 questions file")
        if not isinstance(data, dict) or not isinstance(data.get("questions"), list):
            raise BenchmarkError(f"{path} is not a VQAv2 questions file (no 'questions' list)")
        subtype = data.get("data_subtype", "val2014")
        annotations_path = Path(args.annotations) if args.annotations else path.with_name(
            path.name.replace("OpenEnded_mscoco_", "mscoco_").replace("_questions", "_annotations"))
        if annotations_path == path or not annotations_path.is_file():
            raise BenchmarkError(f"VQAv2 annotations {annotations_path} do not exist; pass --annotations "
                                 "(test-dev has none: it is scored by the EvalAI server)")
        annotations = read_json(annotations_path, "VQAv2 annotations file")
        if not isinstance(annotations, dict) or not isinstance(annotations.get("annotations"), list):
            raise BenchmarkError(f"{annotations_path} is not a VQAv2 annotations file (no 'annotations' list)")
        by_id = {a.get("question_id"): a for a in annotations["annotations"] if isinstance(a, dict)}
        records = data["questions"][:args.limit] if args.limit else data["questions"]
        questions = []
        for i, r in enumerate(records):
            require(r, ("question_id", "question", "image_id"), f"{path} questions[{i}]")
            a = by_id.get(r["question_id"])
            if a is None:
                raise BenchmarkError(f"{annotations_path} has no annotation for question_id {r['question_id']}")
            questions.append(Question({"question_id": r["question_id"]}, r["question"],
                                      f"COCO_{subtype}_{int(r['image_id']):012d}.jpg",
                                      truth=_answers(a.get("answers"),
                                                     f"{annotations_path} question {r['question_id']}"),
                                      group={"type": a.get("answer_type")}))
        return questions, image_root(args, path.parent, subtype, "images")
