"""`python -m data_pipelines.inspect`: training samples as the train step sees them, every token marked.

The tool to reach for when a loss-masking bug strikes: it takes batches from the real pipeline (the one
a config builds, or one given by direct arguments) and prints each sample (each segment of a packed row)
as runs of tokens, decoded, with a mark per run:

    TRAIN   a loss target: the loss at the position before predicts this token (`loss_mask[t-1]`)
    mask    part of the sample, not trained (system prompt, questions, template text)
    IMAGE   an image slot run; `image k` is row k of `pixel_values` (its mean colour is shown)

plus the row, segment id and positions of each sample, and warnings for layouts that are always bugs
(loss on an image slot or across a segment boundary, a target that is not the next token, a sample with
nothing trained). `--tokens` prints one line per token instead (position, segment, id, target, mark,
image and slot). Colour is used on a terminal (`--color auto`); `--color never` gives plain text for
logs and files. It prints `-n` samples (a partial last batch of a one-pass pipeline included; fewer only
when the data has fewer, which it says) and the skipped samples by reason (`no_trained_tokens` among them:
a sample whose loss would be zero is never trained on); it writes no files.

    python -m data_pipelines.inspect --config configs/demo_stage2.yaml [key=value ...] [-n 4] [--split eval]
    python -m data_pipelines.inspect --shards 'out/{00000..00003}.tar' --tokenizer toy:512
    python -m data_pipelines.inspect --instructions data.jsonl --format llava --image-root img \\
        --tokenizer tokenizer.model [--template vicuna_v1] [--packing]

(The module shares its name with the standard library's `inspect`; that is harmless because the package
is only ever imported as `data_pipelines.*` with absolute imports. Never put `data_pipelines/` itself
on `sys.path`, e.g. by running one of its files as a script: use `python -m`.)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Iterator, Sequence
from typing import TextIO

import numpy as np

from data_pipelines import images as image_ops
from data_pipelines.templates import TEMPLATES

TRAIN, MASK, IMAGE = "TRAIN", "mask", "IMAGE"
_COLOURS = {TRAIN: "\033[1;32m", MASK: "\033[2m", IMAGE: "\033[35m", "warn": "\033[1;31m"}
_RESET = "\033[0m"


@dataclasses.dataclass(frozen=True)
class Span:
    """A run of consecutive tokens of one sample with the same mark (an image run is one image)."""
    mark: str
    start: int          # position in the row
    stop: int
    image: int = -1     # pixel_values row of an IMAGE span


@dataclasses.dataclass(frozen=True)
class Sample:
    """One sample of a batch: a whole row, or one segment of a packed row."""
    batch: int
    row: int
    segment: int
    start: int
    stop: int
    spans: tuple[Span, ...]
    warnings: tuple[str, ...]
    origin: str = ""    # e.g. `vis[3]` (source and record) for instruction pipelines


def token_marks(batch: dict[str, np.ndarray], row: int) -> np.ndarray:
    """TRAIN / mask / IMAGE for every position of a row (padding: "")."""
    tokens, loss, seg = batch["tokens"][row], batch["loss_mask"][row], batch["segment_ids"][row]
    marks = np.full(tokens.shape, MASK, dtype=object)
    marks[1:][loss[:-1]] = TRAIN
    marks[tokens < 0] = IMAGE
    marks[seg == 0] = ""
    return marks


def _pixel_row(index: int, row: int, tokens_per_image: int, micro_batches: int) -> int:
    """The `pixel_values` row of the image whose visual token `index` sits in `row` (single process; see
    owl_jax.models.splice.plan_micro_batched_slots: micro-batch j = rows j::k, its images at rows j::k)."""
    return (index // tokens_per_image) * micro_batches + row % micro_batches


def _check(batch: dict[str, np.ndarray], row: int, start: int, stop: int) -> list[str]:
    tokens, targets = batch["tokens"][row], batch["targets"][row]
    loss, seg = batch["loss_mask"][row], batch["segment_ids"][row]
    out = []
    lm = np.flatnonzero(loss[start:stop]) + start
    if not len(lm):
        return ["nothing is trained in this sample"]
    last = lm[lm + 1 >= len(tokens)]
    crossing = [int(t) for t in lm if t + 1 < len(tokens) and seg[t + 1] != seg[t]] + [int(t) for t in last]
    if crossing:
        out.append(f"loss at positions {crossing} predicts a token outside the sample")
    inside = np.asarray([t for t in lm if t + 1 < stop], dtype=np.int64)
    if len(inside):
        on_image = inside[tokens[inside + 1] < 0]
        if len(on_image):
            out.append(f"loss on image slots (positions {[int(t) for t in on_image + 1][:8]})")
        wrong = inside[(tokens[inside + 1] >= 0) & (targets[inside] != tokens[inside + 1])]
        if len(wrong):
            out.append(f"targets differ from the next token at positions {[int(t) for t in wrong][:8]}")
    return out


def batch_samples(batch: dict[str, np.ndarray], batch_number: int, *, tokens_per_image: int,
                  micro_batches: int = 1, origins: dict[tuple[int, int], str] | None = None) -> list[Sample]:
    """The samples of a batch (row-major, segments in order), split into marked spans."""
    out = []
    for row in range(batch["tokens"].shape[0]):
        seg, marks = batch["segment_ids"][row], token_marks(batch, row)
        index = batch.get("image_index")
        for s in [int(x) for x in np.unique(seg) if x > 0]:
            where = np.flatnonzero(seg == s)
            start, stop = int(where[0]), int(where[-1]) + 1
            spans, t = [], start
            while t < stop:
                u = t + 1
                if marks[t] == IMAGE:
                    # one image = one run of slots with consecutive visual-token indices
                    while (u < stop and marks[u] == IMAGE
                           and (index is None or index[row, u] == index[row, u - 1] + 1)):
                        u += 1
                    image = (_pixel_row(int(index[row, t]), row, tokens_per_image, micro_batches)
                             if index is not None and index[row, t] >= 0 else -1)
                    spans.append(Span(IMAGE, t, u, image))
                else:
                    while u < stop and marks[u] == marks[t]:
                        u += 1
                    spans.append(Span(str(marks[t]), t, u))
                t = u
            out.append(Sample(batch_number, row, s, start, stop, tuple(spans), tuple(_check(batch, row, start, stop)),
                              (origins or {}).get((row, s), "")))
    return out


# ----------------------------------------------------------------------------------------------------
# Printing
# ----------------------------------------------------------------------------------------------------

def _mean_rgb(pixels: np.ndarray) -> tuple[int, ...]:
    rgb = (pixels.reshape(-1, 3).mean(0) * image_ops.CLIP_STD + image_ops.CLIP_MEAN) * 255.0
    return tuple(round(float(c)) for c in np.clip(rgb, 0, 255))


def _text(tokenizer, ids: Sequence[int]) -> str:
    """Decoded text of a run, BOS / EOS shown as <s> / </s> (SentencePiece decodes them to nothing) and
    newlines as \\n (one line per run)."""
    special = {tokenizer.bos_id: "<s>", tokenizer.eos_id: "</s>"}
    parts, run = [], []
    for i in (int(x) for x in ids):
        if i in special:
            if run:
                parts.append(tokenizer.decode(run))
                run = []
            parts.append(special[i])
        else:
            run.append(i)
    if run:
        parts.append(tokenizer.decode(run))
    return "".join(parts).replace("\n", "\\n")


def _pieces(tokenizer, ids: Sequence[int]) -> list[str]:
    """Each token's share of the decoded run (decoding tokens one by one loses SentencePiece's spaces)."""
    out, prev = [], ""
    for k in range(len(ids)):
        cur = _text(tokenizer, ids[:k + 1])
        out.append(cur[len(prev):] if cur.startswith(prev) else _text(tokenizer, ids[k:k + 1]))
        prev = cur
    return out


class Printer:
    """Formats samples as text; `colour` adds ANSI colours (marks and warnings)."""

    def __init__(self, tokenizer, *, tokens_per_image: int, colour: bool = False, per_token: bool = False,
                 out: TextIO = sys.stdout):
        self.tokenizer, self.tokens_per_image = tokenizer, tokens_per_image
        self.colour, self.per_token, self.out = colour, per_token, out

    def _paint(self, kind: str, text: str) -> str:
        return f"{_COLOURS[kind]}{text}{_RESET}" if self.colour and kind in _COLOURS else text

    def legend(self) -> None:
        print(f"marks: {self._paint(TRAIN, TRAIN)} = loss target, {self._paint(MASK, MASK)} = in the sample, "
              f"not trained, {self._paint(IMAGE, IMAGE)} = image slots (image k = pixel_values[k])", file=self.out)

    def sample(self, s: Sample, batch: dict[str, np.ndarray]) -> None:
        row = s.row
        tokens = batch["tokens"][row]
        trained = sum(sp.stop - sp.start for sp in s.spans if sp.mark == TRAIN)
        images = [sp.image for sp in s.spans if sp.mark == IMAGE]
        positions = batch["positions"][row, s.start:s.stop]
        head = (f"=== batch {s.batch} row {row} segment {s.segment} · row positions {s.start}..{s.stop - 1} · "
                f"model positions {int(positions[0])}..{int(positions[-1])} · {s.stop - s.start} tokens, "
                f"{trained} trained, {len(images)} image(s)" + (f" · {s.origin}" if s.origin else ""))
        print(head, file=self.out)
        for w in s.warnings:
            print(self._paint("warn", f"  ! {w}"), file=self.out)
        if self.per_token:
            self._tokens(s, batch)
            return
        for sp in s.spans:
            if sp.mark == IMAGE:
                what = f"image {sp.image}" if sp.image >= 0 else "image (no image_index)"
                colour = (f" · mean RGB {_mean_rgb(batch['pixel_values'][sp.image])}"
                          if sp.image >= 0 and "pixel_values" in batch else "")
                body = f"{what} · {sp.stop - sp.start} slots{colour}"
            else:
                body = _text(self.tokenizer, tokens[sp.start:sp.stop])
            print(f"  {self._paint(sp.mark, f'{sp.mark:<5}')} | {self._paint(sp.mark, body)}", file=self.out)

    def _tokens(self, s: Sample, batch: dict[str, np.ndarray]) -> None:
        row = s.row
        tokens, targets, seg = batch["tokens"][row], batch["targets"][row], batch["segment_ids"][row]
        index = batch.get("image_index")
        print("    pos  seg     id  target  mark   token", file=self.out)
        for sp in s.spans:
            pieces = [] if sp.mark == IMAGE else _pieces(self.tokenizer, tokens[sp.start:sp.stop])
            for t in range(sp.start, sp.stop):
                if sp.mark == IMAGE:
                    slot = int(index[row, t]) % self.tokens_per_image if index is not None else -1
                    piece = f"<image {sp.image} slot {slot}>"
                else:
                    piece = f"'{pieces[t - sp.start]}'"
                line = (f"  {t:>5} {int(seg[t]):>4} {int(tokens[t]):>6} {int(targets[t]):>7}  "
                        f"{sp.mark:<5}  {piece}")
                print(self._paint(sp.mark, line), file=self.out)


# ----------------------------------------------------------------------------------------------------
# Pipelines
# ----------------------------------------------------------------------------------------------------

def _origins(pipeline) -> dict[tuple[int, int], str]:
    """(row, segment) -> `source[record]` (instructions) or the shard key (captions) of the last batch."""
    infos = getattr(pipeline, "last_batch", None) or []
    return {(i.row, i.segment): i.key if hasattr(i, "key") else f"{i.source}[{i.record}]" for i in infos}


def iter_samples(pipeline, num_samples: int, *, tokens_per_image: int
                 ) -> Iterator[tuple[Sample, dict[str, np.ndarray]]]:
    """(sample, its batch) for the first `num_samples` samples of the pipeline's batches."""
    count = batch_number = 0
    micro = getattr(pipeline, "micro_batches", 1)
    while count < num_samples:
        try:
            batch = next(pipeline)
        except StopIteration:
            return
        for s in batch_samples(batch, batch_number, tokens_per_image=tokens_per_image, micro_batches=micro,
                               origins=_origins(pipeline)):
            yield s, batch
            count += 1
            if count == num_samples:
                return
        batch_number += 1


def pipeline_from_config(path: str, overrides: Sequence[str], split: str):
    """(pipeline, tokenizer, tokens_per_image) the train CLI would build (inline decoding)."""
    # Host-side only: jax is imported for the process count; never claim an accelerator (or wake libtpu).
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from data_pipelines.tokenizers import load_tokenizer
    from owl_jax.config import ConfigError, load_config
    from owl_jax.data import make_pipeline

    cfg = load_config(path, ["data.num_workers=0", *overrides])
    if not cfg.data.tokenizer:
        raise ConfigError("data.tokenizer is empty (path to tokenizer.model / tokenizer.json, or toy:VOCAB)")
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    return make_pipeline(cfg, tokenizer, split=split), tokenizer, cfg.model.tokens_per_image


def pipeline_from_args(args: argparse.Namespace):
    """(pipeline, tokenizer, tokens_per_image) from direct arguments."""
    from data_pipelines.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    common = {"tokenizer": tokenizer, "seq_len": args.seq_len, "rows": args.rows, "image_size": args.image_size,
              "tokens_per_image": args.tokens_per_image, "seed": args.seed, "train": args.train, "epochs": 1,
              "max_pixels": args.max_pixels}
    if args.shards:
        from data_pipelines.captions import CaptionPipeline
        budget = args.image_budget or (4 * args.rows if args.packing else args.rows)
        return (CaptionPipeline(args.shards, image_budget=budget, template=args.caption_template, shuffle=args.train,
                                packing=args.packing, **common), tokenizer, args.tokens_per_image)
    from data_pipelines.instructions import InstructionPipeline, InstructionSource
    source = InstructionSource("data", args.instructions, args.format, image_root=args.image_root)
    return (InstructionPipeline([source], image_budget=args.image_budget or 4 * args.rows, packing=args.packing,
                                template=args.template or "mplug_owl", system_prompt=args.system_prompt, **common),
            tokenizer, args.tokens_per_image)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_pipelines.inspect", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="YAML config: inspect the pipeline that config trains on")
    src.add_argument("--shards", nargs="+", help="caption shards (paths or brace patterns)")
    src.add_argument("--instructions", help="an instruction .json / .jsonl file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (with --config)")
    p.add_argument("-n", "--samples", type=int, default=4, help="samples to print (default 4)")
    p.add_argument("--split", choices=("train", "eval"), default="train", help="with --config")
    p.add_argument("--tokens", action="store_true", help="one line per token instead of runs")
    p.add_argument("--color", "--colour", choices=("auto", "always", "never"), default="auto")
    d = p.add_argument_group("direct arguments (with --shards / --instructions)")
    d.add_argument("--tokenizer", help="tokenizer.model / tokenizer.json / folder / toy:VOCAB")
    d.add_argument("--format", default="official", help="instruction format (a key of conversation.READERS)")
    d.add_argument("--image-root", default="", help="folder instruction image paths are relative to")
    d.add_argument("--caption-template", default="<image>{caption}", help="caption template (with --shards)")
    d.add_argument("--template", default=None, choices=sorted(TEMPLATES),
                   help="conversation template of --instructions (default mplug_owl; with --config: data.template)")
    d.add_argument("--system-prompt", default=None, help="system prompt (default: the template's)")
    d.add_argument("--seq-len", type=int, default=256)
    d.add_argument("--rows", type=int, default=4)
    d.add_argument("--image-budget", type=int, default=0, help="image slots per batch (default: rows, or 4x rows)")
    d.add_argument("--image-size", type=int, default=224)
    d.add_argument("--tokens-per-image", type=int, default=65)
    d.add_argument("--packing", action="store_true", help="pack several samples per row (segment ids)")
    d.add_argument("--train", action="store_true", help="training order and augmentation (default: eval)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--max-pixels", type=int, default=image_ops.DEFAULT_MAX_PIXELS,
                   help="skip larger images as decompression_bomb (with --config: data.max_pixels=N)")
    return p


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    from data_pipelines.captions import DataError

    out = out or sys.stdout
    p = _parser()
    args = p.parse_args(argv)
    if args.overrides and not args.config:
        p.error("key=value overrides need --config")
    if not args.config and not args.tokenizer:
        p.error("--shards / --instructions need --tokenizer")
    if (args.template or args.system_prompt is not None) and not args.instructions:
        p.error("--template / --system-prompt are for --instructions (with --config: data.template=...)")
    try:
        if args.config:
            from owl_jax.config import ConfigError
            try:
                pipeline, tokenizer, tpi = pipeline_from_config(args.config, args.overrides, args.split)
            except ConfigError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
        else:
            pipeline, tokenizer, tpi = pipeline_from_args(args)
        colour = args.color == "always" or (args.color == "auto" and out.isatty())
        printer = Printer(tokenizer, tokens_per_image=tpi, colour=colour, per_token=args.tokens, out=out)
        printer.legend()
        template = getattr(pipeline, "template", None)
        if template is not None:
            print(f"(conversation template {template.name})", file=out)
        shown = 0
        try:
            for sample, batch in iter_samples(pipeline, args.samples, tokens_per_image=tpi):
                printer.sample(sample, batch)
                shown += 1
        finally:
            pipeline.close()
        skipped = pipeline.skip_counts()
        short = f"; the data has only {shown}" if shown < args.samples else ""
        print(f"({shown} sample(s){short}; skipped so far: {skipped or 'none'})", file=out)
    except (DataError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
