"""Evaluation without exporting: multiple-choice VQA and caption matching scored by likelihood.

`python -m owl_jax.evaluate --checkpoint RUN_DIR --task vqa --questions eval.jsonl --image-root DIR`

Each question (`{"image", "question", "answer", "choices", "kind"}`) is asked in the official conversation
template; every candidate answer is scored by its mean token negative log-likelihood under the model and
the best one is the prediction. Accuracy is reported per `kind` next to chance (1 / number of choices).
Scoring rather than free generation keeps the metric exact for short answers and cheap on a CPU.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from owl_jax.config import Config


def _choice_batch(cfg: Config, tokenizer, question: str, choices: Sequence[str], pixels: np.ndarray | None):
    from data_pipelines.conversation import SYSTEM_PROMPT, make_conversation
    from data_pipelines.packing import pad_batch
    from data_pipelines.tokenize import to_training_sample
    from owl_jax.models.splice import plan_image_slots
    tpi = cfg.model.tokens_per_image
    samples = []
    for choice in choices:
        turns = ([("human", "<image>")] if pixels is not None else []) + [("human", question), ("ai", choice)]
        conv = make_conversation(turns, images=["image"] if pixels is not None else [], system=SYSTEM_PROMPT)
        samples.append(to_training_sample(conv, tokenizer, cfg.data.seq_len, tpi, images=conv.images))
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


def load_model_for_eval(checkpoint: str):
    """(config, model, tokenizer) from a training run directory (latest step) or one step directory."""
    from data_pipelines.tokenizers import load_tokenizer
    from owl_jax.checkpoint import load_run
    cfg, model = load_run(checkpoint)
    return cfg, model, load_tokenizer(cfg.data.tokenizer)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m owl_jax.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="training run directory (or a step directory)")
    parser.add_argument("--task", choices=["vqa", "captions"], default="vqa")
    parser.add_argument("--questions", required=True,
                        help="jsonl: vqa {image, question, answer, choices, kind}; captions {image, caption}")
    parser.add_argument("--image-root", default="")
    parser.add_argument("--limit", type=int, default=0)
    args = parser.parse_args(argv)
    cfg, model, tokenizer = load_model_for_eval(args.checkpoint)
    with open(args.questions) as f:
        questions = [json.loads(line) for line in f if line.strip()]
    if args.limit:
        questions = questions[:args.limit]
    if args.task == "vqa":
        results = multiple_choice_accuracy(cfg, model, tokenizer, questions, args.image_root)
    else:
        results = caption_matching_accuracy(cfg, model, tokenizer, questions, args.image_root)
    for kind, r in sorted(results.items()):
        print(f"{kind:>10}: accuracy {100 * r['accuracy']:5.1f}%  (chance {100 * r['chance']:4.1f}%, "
              f"{r['count']} questions)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
