"""COCO captions (Karpathy test split): CIDEr-D and BLEU-4 of one generated caption per image.

Files: Karpathy's `dataset_coco.json` (cs.stanford.edu/people/karpathy/deepimagesent; `{"images":
[{"filepath", "filename", "split", "cocoid", "sentences": [{"raw"}]}]}`; `--split test`, 5000 images;
images `<filepath>/<filename>` under `--image-root`, default the json's folder) or a COCO-format
caption file (`captions_val2014.json`, LAVIS's `coco_karpathy_test_gt.json`: `{"images": [{"id",
"file_name"}], "annotations": [{"image_id", "caption"}]}`; images `<file_name>`, default root
`DATA_DIR/val2014`). `--limit N` takes the first N images.

Every image is asked the caption instruction (`--prompt-suffix` replaces it). References and captions
are tokenised as pycocoevalcap does (`--caption-tokenizer auto`: its Java PTB tokenizer when
`pip install -e ".[eval]"` put it there and `java` runs, else the pure-Python one; the scores file says
which) and scored by `owl_jax.evals.caption_metrics` (BLEU-1..4, CIDEr-D; the table shows them ×100
as papers do). `write_official` writes the COCO results json (`[{"image_id", "caption"}]`) that
pycocoevalcap's `COCOEvalCap` takes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from owl_jax.evals.base import CAPTION, Benchmark, BenchmarkError, Question, image_root, read_json, require
from owl_jax.evals.caption_metrics import bleu, cider_d, tokenize


class COCOCaptions(Benchmark):
    name = "coco"
    suffix = CAPTION
    outputs = (".coco_results.json",)

    def __init__(self, tokenizer: str = "auto"):
        self.tokenizer = tokenizer

    def load(self, args):
        self.tokenizer = getattr(args, "caption_tokenizer", None) or self.tokenizer
        path = Path(args.data)
        data = read_json(path, "COCO caption file")
        if not isinstance(data, dict) or not isinstance(data.get("images"), list):
            raise BenchmarkError(f"{path} is neither Karpathy's dataset_coco.json nor a COCO caption file "
                                 "(no 'images')")
        if "annotations" in data:
            items = self._coco_format(data, path)
            default_roots = ("val2014", "images", os.curdir)
        else:
            items = self._karpathy(data, path, args.split or "test")
            default_roots = (os.curdir, "images")
        if args.limit:
            items = items[:args.limit]
        questions = [Question({"question_id": image_id}, "", image, truth=refs) for image_id, image, refs in items]
        return questions, image_root(args, path.parent, *default_roots)

    @staticmethod
    def _karpathy(data: dict, path: Path, split: str) -> list:
        items, splits = [], set()
        for i, im in enumerate(data["images"]):
            require(im, ("filename", "split", "sentences"), f"{path} images[{i}]")
            splits.add(im["split"])
            if im["split"] != split:
                continue
            image = os.path.join(im.get("filepath", ""), im["filename"])
            refs = [s["raw"] if isinstance(s, dict) else str(s) for s in im["sentences"]]
            items.append((im.get("cocoid", im.get("imgid", i)), image, refs))
        if not items:
            have = ", ".join(sorted(map(str, splits)))
            raise BenchmarkError(f"{path} has no images of split {split!r} (it has {have}); choose one with --split")
        return items

    @staticmethod
    def _coco_format(data: dict, path: Path) -> list:
        refs: dict = {}
        for i, a in enumerate(data["annotations"]):
            require(a, ("image_id", "caption"), f"{path} annotations[{i}]")
            refs.setdefault(a["image_id"], []).append(a["caption"])
        items = []
        for i, im in enumerate(data["images"]):
            require(im, ("id", "file_name"), f"{path} images[{i}]")
            if im["id"] in refs:
                items.append((im["id"], im["file_name"], refs[im["id"]]))
        if not items:
            raise BenchmarkError(f"{path} has no image with a caption")
        return items

    def score(self, questions, texts):
        captions = [c for q in questions for c in q.truth] + list(texts)
        tokens, used = tokenize(captions, self.tokenizer)
        references, hypotheses, k = {}, {}, 0
        for i, q in enumerate(questions):
            references[i] = tokens[k:k + len(q.truth)]
            k += len(q.truth)
        for i in range(len(questions)):
            hypotheses[i] = tokens[k + i]
        scores = dict(zip(("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"), bleu(hypotheses, references)))
        scores["CIDEr"] = cider_d(hypotheses, references)
        scores["count"] = len(questions)
        scores["tokenizer"] = used
        return scores

    def table(self, scores):
        metrics = ("CIDEr", "Bleu_4", "Bleu_1", "Bleu_2", "Bleu_3")
        return ([*metrics, "images", "tokenizer"],
                [[*(f"{100 * scores[m]:.2f}" for m in metrics), scores["count"], scores["tokenizer"]]])

    def write_official(self, questions, texts, stem):
        path = stem + ".coco_results.json"
        with open(path, "w", encoding="utf-8") as f:
            json.dump([{"image_id": q.question_id, "caption": t} for q, t in zip(questions, texts)], f)
        return [path]
