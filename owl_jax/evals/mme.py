"""MME: 14 perception and cognition subtasks, two yes/no questions per image.

Files (github.com/BradyFU/Awesome-Multimodal-Large-Language-Models, Evaluation branch; request the
data there): `MME_Benchmark_release_version/<subtask>/` with either `images/` + `questions_answers_YN/`
(artwork, celebrity, landmark, posters, scene) or the images and their `.txt` files side by side; each
`.txt` holds `question<TAB>Yes|No` lines for the image of the same name. `--data` is that folder.
Also read: the flattened tsv of VLMEvalKit (`MME.tsv`: index, image (base64, or the index of a row with
the same image), question, answer, category).

The question is asked as given (it ends in "Please answer yes or no.") with the short-answer
instruction after it. Scoring is the official `eval_tool/calculation.py`: an answer is "yes" / "no"
exactly, else by whether its first 4 characters contain "yes", then "no", else "other" (wrong);
per subtask accuracy and accuracy+ (images with both questions right), score = 100 × (acc + acc+);
perception = the sum over the 10 perception subtasks (max 2000), cognition over the 4 others (max 800).
`write_official` fills the eval tool's `<subtask>.txt` files (image, question, truth, answer per line)
in `<answers>.mme/`, so `python calculation.py --results_dir <answers>.mme` cross-checks the numbers.
"""

from __future__ import annotations

import base64
import binascii
import os
import sys
from pathlib import Path

from owl_jax.evals.base import SHORT_ANSWER, Benchmark, BenchmarkError, Question, accuracy, is_missing
from owl_jax.evals.tsv import read_tsv, resolve_images

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
_IMAGE_EXTENSIONS = (".jpg", ".png", ".jpeg", ".JPG", ".PNG", ".JPEG")


def mme_answer(text: str) -> str:
    """"yes", "no" or "other" as the official MME calculation reads an answer."""
    text = text.lower()
    if text in ("yes", "no"):
        return text
    head = text[:4]
    return "yes" if "yes" in head else ("no" if "no" in head else "other")


def _image_file(folder: Path, stem: str) -> Path | None:
    for ext in _IMAGE_EXTENSIONS:
        if (folder / (stem + ext)).is_file():
            return folder / (stem + ext)
    return None


def _read_folder(data: Path, limit: int) -> list[Question]:
    found = [t for t in (*PERCEPTION, *COGNITION) if (data / t).is_dir()]
    if not found:
        raise BenchmarkError(f"no MME subtask folders in {data} (expected {', '.join(PERCEPTION + COGNITION)})")
    missing = [t for t in (*PERCEPTION, *COGNITION) if t not in found]
    if missing:
        print(f"warning: MME subtasks missing in {data}: {', '.join(missing)} (their totals are partial)",
              file=sys.stderr)
    questions, images = [], 0
    for task in found:
        folder = data / task
        qa, pictures = ((folder / "questions_answers_YN", folder / "images")
                        if (folder / "questions_answers_YN").is_dir() else (folder, folder))
        for txt in sorted(qa.glob("*.txt")):
            if limit and images >= limit:
                return questions
            image = _image_file(pictures, txt.stem)
            if image is None:
                raise BenchmarkError(f"no image for {txt} (looked for {pictures / txt.stem}.jpg/.png)")
            rel = image.relative_to(data).as_posix()
            try:
                lines = [line.rstrip("\n").rstrip("\r") for line in txt.read_text(encoding="utf-8").splitlines()]
            except (OSError, UnicodeDecodeError) as e:
                raise BenchmarkError(f"cannot read {txt}: {getattr(e, 'strerror', None) or e}") from None
            lines = [line for line in lines if line.strip()]
            for i, line in enumerate(lines):
                parts = line.split("\t")
                if len(parts) < 2 or parts[1].strip().lower() not in ("yes", "no"):
                    raise BenchmarkError(f"{txt} line {i + 1} is not 'question<TAB>Yes|No'")
                questions.append(Question({"question_id": rel, "question_index": i}, parts[0], rel,
                                          truth=parts[1].strip(),
                                          group={"task": task, "pair": rel, "file": image.name,
                                                 "question": parts[0]}))
            images += 1
    return questions


def _read_tsv(path: Path, limit: int) -> list[Question]:
    header, rows = read_tsv(path, ("index", "image", "question", "answer", "category"), "MME tsv")
    images = resolve_images(rows, path)
    questions, pairs = [], []
    for number, row in enumerate(rows, 2):
        task = row["category"]
        if task not in PERCEPTION + COGNITION:
            raise BenchmarkError(f"{path} line {number}: category {task!r} is not an MME subtask")
        if str(row["answer"]).strip().lower() not in ("yes", "no"):
            raise BenchmarkError(f"{path} line {number}: answer {row['answer']!r} is not Yes or No")
        pair = row.get("image_path") if not is_missing(row.get("image_path")) else images.source[row["index"]]
        pair = f"{task}/{pair}"
        if pair not in pairs:
            if limit and len(pairs) >= limit:
                break
            pairs.append(pair)
        try:
            data = base64.b64decode(images.data[row["index"]], validate=False)
        except (binascii.Error, ValueError):
            raise BenchmarkError(f"{path} line {number}: the image is not base64") from None
        has_path = not is_missing(row.get("image_path"))
        name = os.path.basename(str(row["image_path"])) if has_path else f"{images.source[row['index']]}.jpg"
        questions.append(Question({"question_id": _index(row["index"]), "question_index": 0}, row["question"], data,
                                  truth=str(row["answer"]).strip(),
                                  group={"task": task, "pair": pair, "file": name, "question": row["question"]}))
    return questions


def _index(value: str):
    return int(value) if str(value).isdigit() else value


class MME(Benchmark):
    name = "mme"
    suffix = SHORT_ANSWER
    key_fields = ("question_id", "question_index")  # two questions per image (and image path)
    outputs = (".mme",)

    def load(self, args):
        data = Path(args.data)
        if data.is_dir():
            return _read_folder(data, args.limit), str(data)
        if data.is_file():
            return _read_tsv(data, args.limit), None
        raise BenchmarkError(f"MME folder (MME_Benchmark_release_version) or tsv {data} does not exist")

    def score(self, questions, texts):
        tasks: dict[str, dict] = {}
        for q, text in zip(questions, texts):
            t = tasks.setdefault(q.group["task"], {"correct": 0, "count": 0, "other": 0, "pairs": {}})
            pred = mme_answer(text)
            right = pred == q.truth.lower()
            t["correct"] += right
            t["count"] += 1
            t["other"] += pred == "other"
            t["pairs"][q.group["pair"]] = t["pairs"].get(q.group["pair"], True) and right
        scores: dict[str, dict] = {}
        for task in (*PERCEPTION, *COGNITION):
            if task in tasks:
                t = tasks[task]
                acc, acc_plus = accuracy(t["correct"], t["count"]), accuracy(sum(t["pairs"].values()), len(t["pairs"]))
                scores[task] = {"accuracy": acc, "accuracy_plus": acc_plus, "score": 100 * (acc + acc_plus),
                                "other": t["other"], "count": t["count"], "images": len(t["pairs"])}
        for total, members in (("perception", PERCEPTION), ("cognition", COGNITION)):
            present = [m for m in members if m in scores]
            if present:
                scores[total] = {"score": sum(scores[m]["score"] for m in present), "subtasks": len(present),
                                 "complete": len(present) == len(members)}
        return scores

    def table(self, scores):
        rows = []
        for task in (*PERCEPTION, *COGNITION):
            if task in scores:
                s = scores[task]
                rows.append([task, f"{100 * s['accuracy']:.2f}", f"{100 * s['accuracy_plus']:.2f}", f"{s['score']:.2f}",
                             s["count"]])
        for total, members in (("perception", PERCEPTION), ("cognition", COGNITION)):
            if total in scores:
                s = scores[total]
                label = total if s["complete"] else f"{total} ({s['subtasks']} of {len(members)} subtasks)"
                rows.append([label, "", "",
                             f"{s['score']:.2f}", ""])
        return ["subtask", "acc", "acc+", "score", "questions"], rows

    def write_official(self, questions, texts, stem):
        folder = Path(stem + ".mme")
        folder.mkdir(exist_ok=True)
        lines: dict[str, list[str]] = {}
        for q, text in zip(questions, texts):
            answer = " ".join(text.replace("\t", " ").splitlines())
            lines.setdefault(q.group["task"], []).append(
                "\t".join((q.group["file"], q.group["question"], q.truth, answer)) + "\n")
        paths = []
        for task, task_lines in lines.items():
            path = folder / f"{task}.txt"
            path.write_text("".join(task_lines), encoding="utf-8")
            paths.append(str(path))
        return paths
