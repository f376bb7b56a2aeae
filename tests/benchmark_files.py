"""Small benchmark files in the exact published formats (POPE, ScienceQA, MME folder and tsv, TextVQA,
VQAv2, GQA, SEED-Bench, MMBench, Karpathy COCO), with the hand-written answers the scorer tests give
them. Each `write_*` writes into a folder and returns (the `--data` path, extra CLI arguments)."""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image


def image_bytes(seed: int, size=(40, 56)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def save_image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(image_bytes(seed))


def _jsonl(path: Path, records) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


# ---------------------------------------------------------------------- POPE
POPE_RANDOM = [("COCO_val2014_000000000001.jpg", "Is there a dog in the image?", "yes", "Yes, there is a dog."),
               ("COCO_val2014_000000000001.jpg", "Is there a car in the image?", "no", "No."),
               ("COCO_val2014_000000000002.jpg", "Is there a cat in the image?", "yes",
                "There is no cat in the image."),
               ("COCO_val2014_000000000002.jpg", "Is there a bus in the image?", "no", "Nope")]
POPE_ADVERSARIAL = [("COCO_val2014_000000000001.jpg", "Is there a person in the image?", "yes", "yes"),
                    ("COCO_val2014_000000000002.jpg", "Is there a chair in the image?", "yes",
                     "The answer is not clear. Yes"),
                    ("COCO_val2014_000000000002.jpg", "Is there a table in the image?", "no", "No, there is not.")]


def write_pope(root: Path):
    d = root / "pope"
    for name, rows in (("random", POPE_RANDOM), ("adversarial", POPE_ADVERSARIAL)):
        _jsonl(d / f"coco_pope_{name}.json", [{"question_id": i + 1, "image": im, "text": q, "label": label}
                                              for i, (im, q, label, _) in enumerate(rows)])
    for seed, name in enumerate(("COCO_val2014_000000000001.jpg", "COCO_val2014_000000000002.jpg")):
        save_image(d / "val2014" / name, seed)
    return d, []


# ---------------------------------------------------------------------- ScienceQA
def _problem(question, choices, answer, hint, image, subject, grade, split="test"):
    return {"question": question, "choices": choices, "answer": answer, "hint": hint, "image": image,
            "task": "closed choice", "grade": grade, "subject": subject, "topic": "t", "category": "c",
            "skill": "s", "lecture": "", "solution": "", "split": split}


SQA = {  # pid: (problem, answer text)
    "5": (_problem("Which animal is shown?", ["cat", "dog"], 1, "", "image.png", "natural science", "grade3"), "B"),
    "6": (_problem("Which word comes first?", ["a", "b", "c"], 0, "A story.", None, "social science", "grade8"),
          "A. a"),
    "7": (_problem("Which is it?", ["x", "y"], 0, "Look at the picture.", "image.png", "language science",
                   "grade10"), "C"),
    "8": (_problem("Pick one.", ["p", "q", "r", "s"], 3, "", None, "natural science", "grade2"), "I think it is D"),
    "9": (_problem("Pick again.", ["u", "v"], 1, "", None, "natural science", "grade12"), "The answer is B."),
    "10": (_problem("And again.", ["m", "n"], 0, "", None, "social science", "grade1"),
           "The answer is A. The answer is B."),
}


def write_scienceqa(root: Path):
    d = root / "scienceqa"
    d.mkdir(parents=True)
    problems = {pid: p for pid, (p, _) in SQA.items()}
    problems["1"] = _problem("Train question?", ["a", "b"], 0, "", None, "natural science", "grade1", "train")
    (d / "problems.json").write_text(json.dumps(problems))
    (d / "pid_splits.json").write_text(json.dumps({"train": ["1"], "val": [], "test": list(SQA)}))
    for pid, (p, _) in SQA.items():
        if p["image"]:
            save_image(d / "images" / "test" / pid / "image.png", int(pid))
    return d, []


# ---------------------------------------------------------------------- MME
MME = {  # (subtask, image stem): [(question, truth, answer)]
    ("existence", "000000006040"): [("Is there a train in this image? Please answer yes or no.", "Yes", "Yes"),
                                    ("Is there a bed in this image? Please answer yes or no.", "No",
                                     "No, there is not.")],
    ("existence", "000000006471"): [("Is there a bat in this image? Please answer yes or no.", "Yes", "yes."),
                                    ("Is there a giraffe in this image? Please answer yes or no.", "No", "I think so")],
    ("artwork", "10002"): [("Is this artwork created by Botticelli? Please answer yes or no.", "Yes", "No"),
                           ("Is this artwork created by Monet? Please answer yes or no.", "No", "no")],
    ("code_reasoning", "0001"): [("Is the output of the code 5? Please answer yes or no.", "Yes", "Yes"),
                                 ("Is the output of the code 6? Please answer yes or no.", "No", "Yes")],
}


def write_mme(root: Path):
    d = root / "MME_Benchmark_release_version"
    for i, ((task, stem), qa) in enumerate(MME.items()):
        folder = d / task
        images, texts = (folder / "images", folder / "questions_answers_YN") if task == "artwork" else (folder, folder)
        save_image(images / f"{stem}.{'png' if task == 'code_reasoning' else 'jpg'}", i)
        texts.mkdir(parents=True, exist_ok=True)
        (texts / f"{stem}.txt").write_text("".join(f"{q}\t{t}\n" for q, t, _ in qa))
    return d, []


def write_mme_tsv(root: Path):
    """VLMEvalKit's MME.tsv: the second question of each image refers to the first row's picture."""
    path = root / "MME.tsv"
    rows = []
    for i, ((task, stem), qa) in enumerate(MME.items()):
        image = base64.b64encode(image_bytes(i)).decode()
        for j, (q, t, _) in enumerate(qa):
            index = 2 * i + j
            rows.append([index, image if j == 0 else str(2 * i), q, t, task])
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["index", "image", "question", "answer", "category"])
        w.writerows(rows)
    return path, []


# ---------------------------------------------------------------------- TextVQA, VQAv2
TEXTVQA = [("what number is shown?", ["two"] * 3 + ["2"] * 2 + ["three"] * 5, "Two."),
           ("what colour is the sign?", ["red"] * 2 + ["blue"] * 8, "Red!"),
           ("what does it say?", ["don't know"] + ["no idea"] * 9, "dont know")]


def write_textvqa(root: Path):
    d = root / "textvqa"
    data = [{"question": q, "image_id": f"img{i}", "image_classes": [], "flickr_original_url": "",
             "flickr_300k_url": "", "image_width": 56, "image_height": 40, "answers": answers,
             "question_tokens": q.split(), "question_id": 34602 + i, "set_name": "val"}
            for i, (q, answers, _) in enumerate(TEXTVQA)]
    d.mkdir(parents=True)
    (d / "TextVQA_0.5.1_val.json").write_text(json.dumps({"dataset_type": "val", "dataset_name": "textvqa",
                                                          "dataset_version": "0.5.1", "data": data}))
    for i in range(len(TEXTVQA)):
        save_image(d / "train_images" / f"img{i}.jpg", i)
    return d / "TextVQA_0.5.1_val.json", []


VQAV2 = [("Is it sunny?", ["yes"] * 10, "yes/no", "Yes"),
         ("How many dogs?", ["2", "2", "two"] + ["3"] * 7, "number", "two")]


def write_vqav2(root: Path):
    d = root / "vqav2"
    d.mkdir(parents=True)
    questions = [{"image_id": 42 + i, "question": q, "question_id": 420 + i} for i, (q, *_) in enumerate(VQAV2)]
    annotations = [{"question_id": 420 + i, "image_id": 42 + i, "answer_type": t, "question_type": "how",
                    "multiple_choice_answer": answers[0],
                    "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                                for j, a in enumerate(answers)]}
                   for i, (_, answers, t, _) in enumerate(VQAV2)]
    (d / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps(
        {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": "val2014",
         "questions": questions}))
    (d / "v2_mscoco_val2014_annotations.json").write_text(json.dumps(
        {"info": {}, "data_type": "mscoco", "data_subtype": "val2014", "annotations": annotations}))
    for i in range(len(VQAV2)):
        save_image(d / "val2014" / f"COCO_val2014_{42 + i:012d}.jpg", i)
    return d / "v2_OpenEnded_mscoco_val2014_questions.json", []


# ---------------------------------------------------------------------- GQA
GQA = {"20968056": ("n161313", "Is the sky blue?", "yes", "verify", "Yes."),
       "20968057": ("n161313", "Which side is the cup on?", "left", "query", "The left."),
       "20968058": ("n161314", "What colour is the car?", "red", "query", "blue")}


def write_gqa(root: Path):
    d = root / "gqa"
    d.mkdir(parents=True)
    data = {qid: {"semantic": [], "entailed": [], "equivalent": [qid], "question": q, "imageId": im,
                  "isBalanced": True, "groups": {"global": None, "local": "x"}, "answer": a,
                  "semanticStr": "", "annotations": {}, "types": {"detailed": "d", "semantic": "attr", "structural": t},
                  "fullAnswer": a}
            for qid, (im, q, a, t, _) in GQA.items()}
    (d / "testdev_balanced_questions.json").write_text(json.dumps(data))
    for i, im in enumerate(("n161313", "n161314")):
        save_image(d / "images" / f"{im}.jpg", i)
    return d / "testdev_balanced_questions.json", []


# ---------------------------------------------------------------------- SEED-Bench
SEED = [("How many towels are in the image?", ["One", "Two", "Three", "Four"], "A", 1, "A"),
        ("How many dogs?", ["one dog", "two dogs", "three dogs", "four dogs"], "B", 5, "(B) two dogs"),
        ("How many cats?", ["one", "two", "three", "four"], "C", 5, "I see three"),
        ("What is the scene?", ["beach", "city", "forest", "desert"], "C", 1, "A or B")]


def write_seed(root: Path):
    d = root / "seed"
    d.mkdir(parents=True)
    questions = [{"answer": a, "choice_a": c[0], "choice_b": c[1], "choice_c": c[2], "choice_d": c[3],
                  "data_id": f"{1454426 + i}_2591111986.jpg", "data_type": "image", "question": q,
                  "question_id": str(101669 + i), "question_type_id": t} for i, (q, c, a, t, _) in enumerate(SEED)]
    questions.append({"answer": "A", "choice_a": "a", "choice_b": "b", "choice_c": "c", "choice_d": "d",
                      "data_id": "v.mp4", "data_type": "video", "question": "What happens next?",
                      "question_id": "9", "question_type_id": 10, "segment": [0, 1]})
    (d / "SEED-Bench.json").write_text(json.dumps({"questions": questions, "question_type": {
        "Scene Understanding": 1, "Instance Identity": 2, "Instance Counting": 5, "Action Prediction": 11}}))
    for i in range(len(SEED)):
        save_image(d / "SEED-Bench-image" / f"{1454426 + i}_2591111986.jpg", i)
    return d / "SEED-Bench.json", []


# ---------------------------------------------------------------------- MMBench
MMBENCH = [  # index: (options, answer, hint, category, l2, answers per rotation)
    (0, ["apple", "banana", "cherry", "date"], "C", "Look closely.", "cat1", "l2a",
     ["C", "B", "The answer is A", "cherry"]),
    (1, ["yes", "no"], "A", None, "cat1", "l2a", ["A", "A"]),
    (2, ["red", "green", "blue"], "B", None, "cat2", "l2b", ["B", "A or C", "C"]),
]


def write_mmbench(root: Path):
    path = root / "mmbench_dev_20230712.tsv"
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source",
              "l2-category", "comment", "split"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(header)
        for index, options, answer, hint, cat, l2, _ in MMBENCH:
            cells = (options + ["nan"] * 4)[:4]
            image = "0" if index == 1 else base64.b64encode(image_bytes(index)).decode()  # row 1 shares row 0's
            w.writerow([index, f"Which one is it (question {index})?", hint if hint else "nan", *cells, answer, cat,
                        image, "src", l2, "nan", "dev"])
    return path, []


# ---------------------------------------------------------------------- COCO (Karpathy)
COCO = [  # (cocoid, split, references, caption)
    (391895, "test", ["A man riding a bike.", "A man rides a bike"], "a man riding a bike"),
    (522418, "test", ["Two dogs play in snow.", "Two dogs are playing in the snow."], "zebra grazing"),
    (184613, "test", ["A red bus (parked) at the station.", "A red bus parked at the station"],
     "A red bus parked at the station."),
    (318219, "train", ["A train question."], ""),
]


def write_coco(root: Path):
    d = root / "coco"
    d.mkdir(parents=True)
    images = [{"filepath": "val2014", "sentids": [], "filename": f"COCO_val2014_{cid:012d}.jpg", "imgid": i,
               "split": split, "sentences": [{"tokens": r.lower().split(), "raw": r, "imgid": i, "sentid": j}
                                             for j, r in enumerate(refs)], "cocoid": cid}
              for i, (cid, split, refs, _) in enumerate(COCO)]
    (d / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    for i, (cid, *_) in enumerate(COCO):
        save_image(d / "val2014" / f"COCO_val2014_{cid:012d}.jpg", i)
    return d / "dataset_coco.json", []


WRITERS = {"pope": write_pope, "scienceqa": write_scienceqa, "mme": write_mme, "textvqa": write_textvqa,
           "vqav2": write_vqav2, "gqa": write_gqa, "seed": write_seed, "mmbench": write_mmbench, "coco": write_coco}
