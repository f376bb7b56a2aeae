"""MMBench (dev): multiple-choice questions with base64 images, scored by circular evaluation.

File: `mmbench_dev_20230712.tsv` (download.openmmlab.com/mmclassification/datasets/mmbench/), one row
per question (a tsv that already holds rotated copies of its questions would be rotated again):
`index`, `question`, `hint`, `A`..`D` (the options; a question has the first 2-4), `answer`,
`category`, `l2-category`, `image` (base64, or the index of a row with the same picture), `source`,
`comment`, `split`. `--data` is the tsv; `--limit N` takes its first N questions (each with all its
rotations).

Circular evaluation (MMBench's CircularEval): a question with n options is asked n times, the options
rotated by 0..n-1 places under fixed letters (LLaVA's `model_vqa_mmbench.py --all-rounds`), and counts
as right only when every rotation is answered right. The prompt is LLaVA-1.5's: the hint (if any) and
the question, `A. ...` lines, the multiple-choice instruction. Each answer's letter is read by
VLMEvalKit's matching (`owl_jax.evals.choices`; what it leaves undecided the official scorer would ask
ChatGPT about: wrong here, counted as `undecided`). Reported: circular accuracy overall, per category
and per l2-category, and the first rotation's accuracy alone (`single`).

`write_official` writes the submission table of LLaVA's `convert_mmbench_for_submission.py` (the tsv
without hint/category/source/image/comment/l2-category, a `prediction` column with the first
rotation's answer) as `<answers>.mmbench.tsv`, and as `.xlsx` when openpyxl is installed.
"""

from __future__ import annotations

import base64
import binascii
import csv
import sys
from pathlib import Path

from owl_jax.evals.base import (LETTERS, MULTIPLE_CHOICE, Benchmark, BenchmarkError, Question, accuracy, is_missing,
                                options_text)
from owl_jax.evals.choices import infer_option
from owl_jax.evals.tsv import read_tsv, resolve_images

_DROPPED = ("hint", "category", "source", "image", "comment", "l2-category")


def rotation_letter(letter: str | None, rotation: int, num_options: int) -> str | None:
    """The original letter of the option shown under `letter` when the options are rotated by `rotation`."""
    if letter is None or letter not in LETTERS[:num_options]:
        return None
    return LETTERS[(LETTERS.index(letter) + rotation) % num_options]


class MMBench(Benchmark):
    name = "mmbench"
    suffix = MULTIPLE_CHOICE
    key_fields = ("question_id", "round_id")
    outputs = (".mmbench.tsv", ".mmbench.xlsx")

    def load(self, args):
        path = Path(args.data)
        header, rows = read_tsv(path, ("index", "question", "A", "B", "answer", "image"), "MMBench tsv")
        self._header, self._rows = header, rows
        images = resolve_images(rows, path)
        questions = []
        for number, row in enumerate(rows[:args.limit] if args.limit else rows, 2):
            options = []
            for letter in LETTERS:
                if letter not in row or is_missing(row[letter]):
                    break
                options.append(row[letter])
            answer = row["answer"].strip()
            if answer not in LETTERS[:len(options)]:
                raise BenchmarkError(f"{path} line {number}: answer {row['answer']!r} is not one of its options "
                                     f"{LETTERS[:len(options)]} (the test split has no answers: the server scores it)")
            try:
                image = base64.b64decode(images.data[row["index"]])
            except (binascii.Error, ValueError):
                raise BenchmarkError(f"{path} line {number}: the image is not base64") from None
            hint = "" if is_missing(row.get("hint")) else f"{row['hint']}\n"
            qid = int(row["index"]) if row["index"].isdigit() else row["index"]
            for r in range(len(options)):
                shown = options[r:] + options[:r]
                questions.append(Question(
                    {"question_id": qid, "round_id": r, "options": shown, "option_char": list(LETTERS[:len(shown)])},
                    f"{hint}{row['question']}\n{options_text(shown)}", image, truth=answer,
                    group={"category": row.get("category"), "l2": row.get("l2-category"), "rounds": len(options),
                           "choices": dict(zip(LETTERS, shown)), "index": row["index"]}))
        return questions, None

    def score(self, questions, texts):
        rounds: dict[str, dict] = {}
        undecided = 0
        for q, text in zip(questions, texts):
            shown = infer_option(text, q.group["choices"])
            undecided += shown is None
            right = rotation_letter(shown, q.fields["round_id"], q.group["rounds"]) == q.truth
            item = rounds.setdefault(q.group["index"], {"group": q.group, "right": {}})
            item["right"][q.fields["round_id"]] = right
        circular: dict[str, list[bool]] = {}
        single = []
        for item in rounds.values():
            g, right = item["group"], item["right"]
            all_right = len(right) == g["rounds"] and all(right.values())
            single.append(right.get(0, False))
            keys = ["overall"] + [f"{kind}/{g[k]}" for kind, k in (("category", "category"), ("l2-category", "l2"))
                                  if not is_missing(g.get(k))]
            for key in keys:
                circular.setdefault(key, []).append(all_right)
        scores = {k: {"accuracy": accuracy(sum(v), len(v)), "count": len(v)} for k, v in circular.items()}
        scores["single"] = {"accuracy": accuracy(sum(single), len(single)), "count": len(single)}
        scores["undecided"] = undecided
        return scores

    def table(self, scores):
        rows = [[k, f"{100 * s['accuracy']:.2f}", s["count"]] for k, s in scores.items() if isinstance(s, dict)]
        rows.sort(key=lambda r: (r[0] != "overall", r[0] != "single", r[0]))
        return ["", "circular accuracy", "questions"], [[("single rotation" if r[0] == "single" else r[0]), *r[1:]]
                                                       for r in rows]

    def write_official(self, questions, texts, stem):
        first = {q.group["index"]: t for q, t in zip(questions, texts) if q.fields["round_id"] == 0}
        columns = [c for c in self._header if c not in _DROPPED]
        columns.insert(min(6, len(columns)), "prediction")
        table = [[first.get(row["index"], "") if c == "prediction" else row.get(c, "") for c in columns]
                 for row in self._rows if row["index"] in first]
        path = stem + ".mmbench.tsv"
        with open(path, "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f, delimiter="\t")
            writer.writerow(columns)
            writer.writerows(table)
        paths = [path]
        try:
            import openpyxl
        except ImportError:
            print("note: openpyxl is not installed, so no .xlsx submission (the .tsv has the same table)",
                  file=sys.stderr)
            return paths
        from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE  # control characters a worksheet cannot hold
        book = openpyxl.Workbook()
        sheet = book.active
        sheet.append(columns)
        for row in table:
            sheet.append([ILLEGAL_CHARACTERS_RE.sub("", c) if isinstance(c, str) else c for c in row])
        book.save(stem + ".mmbench.xlsx")
        return paths + [stem + ".mmbench.xlsx"]
