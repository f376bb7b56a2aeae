"""POPE (object hallucination): yes/no questions about COCO val2014 images, three splits.

Files (github.com/AoiDragon/POPE, `output/coco/`): `coco_pope_random.json`, `coco_pope_popular.json`,
`coco_pope_adversarial.json`, each a jsonl of `{"question_id", "image", "text", "label"}` (label yes/no).
`--data` is that folder (every `coco_pope_*.json` in it) or one of the files; images are COCO val2014
(`--image-root`, default `DATA/val2014`). `--limit N` takes the first N questions of each split.

Scoring is LLaVA's `eval_pope.py`: only the first sentence counts, commas are dropped, and an answer
containing the word "No", "no" or "not" is no — everything else (also "Yes, there is" and "Nope") is
yes. Per split: accuracy, precision, recall, F1 (of the "yes" class), yes-ratio; their mean over the
splits is the number papers report as POPE F1 / accuracy. A split without one predicted or one true
"yes" reports 0 where LLaVA's script would divide by zero.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from owl_jax.evals.base import SHORT_ANSWER, Benchmark, BenchmarkError, Question, image_root, read_jsonl

SPLITS = ("random", "popular", "adversarial")
METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")


def pope_answer(text: str) -> str:
    """"yes" or "no" as LLaVA's POPE scorer reads an answer."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def pope_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict:
    """Accuracy, precision, recall, F1 and yes-ratio of yes/no predictions, with the confusion counts."""
    tp = sum(p == "yes" and t == "yes" for p, t in zip(predictions, labels))
    fp = sum(p == "yes" and t == "no" for p, t in zip(predictions, labels))
    tn = sum(p == "no" and t == "no" for p, t in zip(predictions, labels))
    fn = sum(p == "no" and t == "yes" for p, t in zip(predictions, labels))
    n = len(predictions)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / n if n else 0.0, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": (tp + fp) / n if n else 0.0, "TP": tp, "FP": fp, "TN": tn, "FN": fn, "count": n}


def _split_name(path: Path) -> str:
    name = path.name
    official = name.startswith("coco_pope_") and name.endswith(".json")
    return name[len("coco_pope_"):-len(".json")] if official else path.stem


class POPE(Benchmark):
    name = "pope"
    suffix = SHORT_ANSWER
    key_fields = ("category", "question_id")  # question ids restart in every split

    def load(self, args):
        data = Path(args.data)
        if data.is_dir():
            files = sorted(data.glob("coco_pope_*.json"),
                           key=lambda p: (SPLITS.index(_split_name(p)) if _split_name(p) in SPLITS else 9, p.name))
            if not files:
                raise BenchmarkError(f"no POPE files in {data} (expected coco_pope_random.json, "
                                     "coco_pope_popular.json, coco_pope_adversarial.json)")
        elif data.is_file():
            files = [data]
        else:
            raise BenchmarkError(f"POPE file or folder {data} does not exist")
        questions = []
        for path in files:
            split = _split_name(path)
            records = read_jsonl(path, "POPE file", ("question_id", "image", "text", "label"))
            for number, r in enumerate(records[:args.limit] if args.limit else records, 1):
                if str(r["label"]).lower() not in ("yes", "no"):
                    raise BenchmarkError(f"{path} record {number}: label {r['label']!r} is not yes or no")
                questions.append(Question({"question_id": r["question_id"], "category": split}, r["text"],
                                          r["image"], truth=str(r["label"]).lower(), group={"split": split}))
        root = image_root(args, data if data.is_dir() else data.parent, "val2014", "images", os.curdir)
        return questions, root

    def score(self, questions, texts):
        by_split: dict[str, tuple[list, list]] = {}
        for q, text in zip(questions, texts):
            preds, labels = by_split.setdefault(q.group["split"], ([], []))
            preds.append(pope_answer(text))
            labels.append(q.truth)
        scores = {split: pope_metrics(*pl) for split, pl in by_split.items()}
        if len(scores) > 1:
            scores["average"] = {m: sum(s[m] for s in scores.values()) / len(scores) for m in METRICS}
            scores["average"]["count"] = len(questions)
        return scores

    def table(self, scores):
        header = ["split", *METRICS, "questions"]
        rows = [[split, *(f"{100 * s[m]:.2f}" for m in METRICS), s["count"]] for split, s in scores.items()]
        return header, rows
