"""ScienceQA: multiple-choice science questions, some with a picture (the IMG subset).

Files (github.com/lupantech/ScienceQA, `data/scienceqa/`): `problems.json` (`{pid: {"question",
"choices", "answer" (index), "hint", "image" (file name or null), "subject", "grade", ...}}`) and
`pid_splits.json` (`{"test": [pid, ...], ...}`; 4241 test questions), images in `test/<pid>/image.png`.
`--data` is the folder with both json files (or `problems.json` itself), `--split` the split (test),
`--image-root` the images of that split (default `DATA/images/<split>`, then `DATA/<split>`).

Prompt (LLaVA-1.5 / lmms-eval): `Context: {hint}` when there is one, the question, the options as
`A. ...` lines, then the multiple-choice instruction. Letter parsing is LLaVA's `eval_science_qa.py`:
the answer is exactly a letter, or starts with "X. ", or contains exactly one "The answer is X."; a
letter beyond the question's choices, or none of these, is wrong ("FAILED", counted as `failed`).
Reported as the official table does (tools/evaluate_acc.py): average, NAT / SOC / LAN (subject), TXT
(has a hint), IMG (has an image), NO (neither), G1-6 / G7-12 (grade).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from owl_jax.evals.base import (LETTERS, MULTIPLE_CHOICE, Benchmark, BenchmarkError, Question, accuracy, image_root,
                                options_text, read_json, require)

OPTIONS = "ABCDE"  # LLaVA's scorer: a letter beyond E is never valid
_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")
COLUMNS = (("average", "Avg"), ("natural", "NAT"), ("social", "SOC"), ("language", "LAN"), ("has_text", "TXT"),
           ("has_image", "IMG"), ("no_context", "NO"), ("grade_1_6", "G1-6"), ("grade_7_12", "G7-12"))
_SUBJECT = {"natural science": "natural", "social science": "social", "language science": "language"}


def scienceqa_letter(text: str) -> str:
    """The letter LLaVA's ScienceQA scorer reads in an answer, or "FAILED"."""
    if text in OPTIONS:
        return text
    if len(text) >= 3 and text[0] in OPTIONS and text[1:3] == ". ":
        return text[0]
    found = _ANSWER_IS.findall(text)
    return found[0] if len(found) == 1 else "FAILED"


def choice_index(letter: str, num_choices: int) -> int:
    """The index of `letter` among the question's choices, -1 when it names none of them."""
    return OPTIONS.index(letter) if letter in OPTIONS[:num_choices] else -1


def question_text(problem: dict) -> str:
    context = f"Context: {problem['hint']}\n" if problem.get("hint") else ""
    return f"{context}{problem['question']}\n{options_text(problem['choices'])}"


def _groups(problem: dict) -> list[str]:
    groups = ["average"]
    if problem.get("subject") in _SUBJECT:
        groups.append(_SUBJECT[problem["subject"]])
    has_text, has_image = bool(problem.get("hint")), bool(problem.get("image"))
    groups += [g for g, yes in (("has_text", has_text), ("has_image", has_image),
                                ("no_context", not has_text and not has_image)) if yes]
    grade = str(problem.get("grade", "")).replace("grade", "")
    if grade.isdigit():
        groups.append("grade_1_6" if int(grade) <= 6 else "grade_7_12")
    return groups


class ScienceQA(Benchmark):
    name = "scienceqa"
    suffix = MULTIPLE_CHOICE
    outputs = (".sqa_result.json",)

    def load(self, args):
        data = Path(args.data)
        directory = data if data.is_dir() else data.parent
        problems_path = data / "problems.json" if data.is_dir() else data
        if not data.exists():
            raise BenchmarkError(f"ScienceQA folder {data} does not exist (it holds problems.json and pid_splits.json)")
        problems = read_json(problems_path, "ScienceQA problems file")
        splits = read_json(directory / "pid_splits.json", "ScienceQA split file")
        split = args.split or "test"
        if not isinstance(problems, dict) or not isinstance(splits, dict):
            raise BenchmarkError(f"{problems_path} and pid_splits.json must be JSON objects "
                                 "(pid -> problem, split -> pids)")
        if split not in splits:
            raise BenchmarkError(f"{directory / 'pid_splits.json'} has no split {split!r} (it has "
                                 f"{', '.join(sorted(splits))}); choose one with --split")
        pids = splits[split][:args.limit] if args.limit else splits[split]
        questions = []
        for pid in pids:
            if pid not in problems:
                raise BenchmarkError(f"{problems_path} has no problem {pid!r} (listed in split {split})")
            p = problems[pid]
            require(p, ("question", "choices", "answer"), f"{problems_path} problem {pid}")
            if len(p["choices"]) > len(LETTERS):
                raise BenchmarkError(f"{problems_path} problem {pid} has {len(p['choices'])} choices")
            image = f"{pid}/{p['image']}" if p.get("image") else None
            questions.append(Question({"question_id": pid}, question_text(p), image, truth=int(p["answer"]),
                                      group={"groups": _groups(p), "choices": len(p["choices"])}))
        root = None
        if any(q.image for q in questions):
            root = image_root(args, directory, os.path.join("images", split), split, what=f"{split} image")
        return questions, root

    def recorded_prompt(self, question, prompt):
        """LLaVA's: "<image>\n" before the prompt of a question with a picture (its scorer's IMG subset)."""
        return f"<image>\n{prompt}" if question.image else prompt

    def score(self, questions, texts):
        correct, count = {}, {}
        failed = 0
        for q, text in zip(questions, texts):
            letter = scienceqa_letter(text)
            failed += letter == "FAILED"
            right = choice_index(letter, q.group["choices"]) == q.truth
            for g in q.group["groups"]:
                count[g] = count.get(g, 0) + 1
                correct[g] = correct.get(g, 0) + right
        scores = {g: {"accuracy": accuracy(correct[g], count[g]), "count": count[g]} for g, _ in COLUMNS if g in count}
        scores["failed"] = failed
        return scores

    def table(self, scores):
        present = [(g, label) for g, label in COLUMNS if g in scores]
        header = ["", *(label for _, label in present)]
        return header, [["accuracy", *(f"{100 * scores[g]['accuracy']:.2f}" for g, _ in present)],
                        ["questions", *(scores[g]["count"] for g, _ in present)]]

    def write_official(self, questions, texts, stem):
        """LLaVA's `--output-result` json: `results` ({pid: predicted choice index, -1 for none}) is what
        ScienceQA's own tools/evaluate_acc.py reads."""
        results = {q.question_id: choice_index(scienceqa_letter(t), q.group["choices"])
                   for q, t in zip(questions, texts)}
        correct = sum(results[q.question_id] == q.truth for q in questions)
        path = stem + ".sqa_result.json"
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"acc": 100 * accuracy(correct, len(questions)), "correct": correct, "count": len(questions),
                       "results": results, "outputs": {q.question_id: t for q, t in zip(questions, texts)}},
                      f, indent=2)
        return [path]
