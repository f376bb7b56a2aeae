"""SEED-Bench (image part): four-option questions over 9 image dimensions.

Files (huggingface.co/datasets/AILab-CVC/SEED-Bench): `SEED-Bench.json` (`{"questions": [{"question",
"choice_a".."choice_d", "answer", "question_type_id", "data_id", "data_type", "question_id"}],
"question_type": {name: id}}`), images `SEED-Bench-image/<data_id>` (`--image-root`, default
`DATA_DIR/SEED-Bench-image`). Video questions (`data_type` video, dimensions 10-12) are left out.

Prompt: the question, `A. ...` lines, the multiple-choice instruction (LLaVA-1.5). The predicted
letter is read by VLMEvalKit's matching (`owl_jax.evals.choices`; LLaVA's script takes the answer only
when it is exactly the letter — the same for a model that answers with the letter); accuracy per
dimension and overall. `write_official` writes the leaderboard's upload jsonl (`{"question_id",
"prediction"}`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from owl_jax.evals.base import (MULTIPLE_CHOICE, Benchmark, BenchmarkError, Question, accuracy, image_root,
                                options_text, read_json, require)
from owl_jax.evals.choices import infer_option

_CHOICES = ("choice_a", "choice_b", "choice_c", "choice_d")


class SEEDBench(Benchmark):
    name = "seed"
    suffix = MULTIPLE_CHOICE
    outputs = (".seed_upload.jsonl",)

    def load(self, args):
        path = Path(args.data)
        data = read_json(path, "SEED-Bench file")
        if not isinstance(data, dict) or not isinstance(data.get("questions"), list):
            raise BenchmarkError(f"{path} is not SEED-Bench.json (no 'questions' list)")
        names = {v: k for k, v in (data.get("question_type") or {}).items()}
        root = image_root(args, path.parent, "SEED-Bench-image")
        questions = []
        for i, r in enumerate(data["questions"]):
            require(r, ("question_id", "question", *_CHOICES, "answer", "data_id", "question_type_id"),
                    f"{path} questions[{i}]")
            if r.get("data_type", "image") != "image" or not 1 <= int(r["question_type_id"]) <= 9:
                continue
            if args.limit and len(questions) >= args.limit:
                break
            image = str(r["data_id"])
            if not os.path.isfile(os.path.join(root, image)):  # data ids name the file, with or without .jpg
                image = next((image + ext for ext in (".jpg", ".png")
                              if os.path.isfile(os.path.join(root, image + ext))), image)
            choices = {letter: r[c] for letter, c in zip("ABCD", _CHOICES)}
            dimension = names.get(r["question_type_id"], str(r["question_type_id"]))
            questions.append(Question({"question_id": r["question_id"]},
                                      f"{r['question']}\n{options_text(list(choices.values()))}", image,
                                      truth=str(r["answer"]).strip(),
                                      group={"dimension": dimension, "choices": choices}))
        return questions, root

    def score(self, questions, texts):
        hits: dict[str, list[bool]] = {}
        for q, text in zip(questions, texts):
            right = infer_option(text, q.group["choices"]) == q.truth
            for g in ("overall", q.group["dimension"]):
                hits.setdefault(g, []).append(right)
        return {g: {"accuracy": accuracy(sum(h), len(h)), "count": len(h)} for g, h in hits.items()}

    def table(self, scores):
        return ["dimension", "accuracy", "questions"], [[g, f"{100 * s['accuracy']:.2f}", s["count"]]
                                                       for g, s in scores.items()]

    def write_official(self, questions, texts, stem):
        path = stem + ".seed_upload.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for q, text in zip(questions, texts):
                f.write(json.dumps({"question_id": q.question_id,
                                    "prediction": infer_option(text, q.group["choices"]) or text}) + "\n")
        return [path]
