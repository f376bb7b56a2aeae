"""GQA: compositional questions about Visual Genome images, one answer each (exact match).

Files (cs.stanford.edu/people/dorarad/gqa): `testdev_balanced_questions.json` (`{question_id: {"imageId",
"question", "answer", "types": {"structural", ...}}}`; 12,578 questions), images `images/<imageId>.jpg`
(`--image-root`, default `DATA_DIR/images`).

`accuracy`: the answer equals the ground truth after the VQA normalisation of both
(`owl_jax.evals.normalize`); `exact`: LLaVA's conversion (`text.rstrip('.').lower()`) equals it as the
official `eval.py` compares, which is what `write_official`'s `<answers>.gqa_predictions.json`
(`[{"questionId", "prediction"}]`, the file GQA's eval.py reads) gets scored by. Both per structural
type (verify, query, choose, logical, compare) as eval.py reports.
"""

from __future__ import annotations

import json
from pathlib import Path

from owl_jax.evals.base import (SHORT_ANSWER, Benchmark, BenchmarkError, Question, accuracy, image_root, read_json,
                                require)
from owl_jax.evals.normalize import normalize_answer


def gqa_prediction(text: str) -> str:
    """LLaVA's `convert_gqa_for_eval.py`: the prediction GQA's eval.py compares to the answer."""
    return text.rstrip(".").lower()


class GQA(Benchmark):
    name = "gqa"
    suffix = SHORT_ANSWER
    outputs = (".gqa_predictions.json",)

    def load(self, args):
        path = Path(args.data)
        data = read_json(path, "GQA questions file")
        if not isinstance(data, dict):
            raise BenchmarkError(f"{path} is not a GQA questions file ({{question_id: question}})")
        items = list(data.items())
        questions = []
        for qid, r in items[:args.limit] if args.limit else items:
            require(r, ("imageId", "question", "answer"), f"{path} question {qid}")
            structural = (r.get("types") or {}).get("structural") if isinstance(r.get("types"), dict) else None
            questions.append(Question({"question_id": qid}, r["question"], f"{r['imageId']}.jpg",
                                      truth=str(r["answer"]), group={"type": structural}))
        return questions, image_root(args, path.parent, "images", "../images")

    def score(self, questions, texts):
        hits: dict[str, list[tuple[bool, bool]]] = {}
        for q, text in zip(questions, texts):
            hit = (normalize_answer(text) == normalize_answer(q.truth), gqa_prediction(text) == q.truth)
            for g in ("overall", *([q.group["type"]] if q.group.get("type") else [])):
                hits.setdefault(g, []).append(hit)
        return {g: {"accuracy": accuracy(sum(a for a, _ in h), len(h)), "exact": accuracy(sum(e for _, e in h), len(h)),
                    "count": len(h)} for g, h in hits.items()}

    def table(self, scores):
        return (["", "accuracy", "exact", "questions"],
                [[g, f"{100 * s['accuracy']:.2f}", f"{100 * s['exact']:.2f}", s["count"]] for g, s in scores.items()])

    def write_official(self, questions, texts, stem):
        path = stem + ".gqa_predictions.json"
        with open(path, "w", encoding="utf-8") as f:
            json.dump([{"questionId": q.question_id, "prediction": gqa_prediction(t)}
                       for q, t in zip(questions, texts)], f)
        return [path]
