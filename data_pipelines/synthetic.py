"""The demo world: a small, deterministic, seeded universe of coloured shapes for CPU demos and tests.

Every picture (default 64×64) shows one, sometimes two, coloured shapes on a dark or gray background
with mild noise, a slight gradient and colour/size/position jitter. Attributes:

    colour:   red green blue yellow purple orange white
    shape:    circle square triangle star cross
    size:     small large
    position: left right top bottom center      (two-shape pictures: left+right or top+bottom)

From those pictures `make_world` writes, under one folder:

    images/{train,eval}/NNNNNN.png          the pictures (paths in json files are relative to images/)
    captions/{train,eval}-NNNNNN.tar        webdataset caption shards (`key.png` + `key.txt` + `key.json`)
    pictures_{train,eval}.jsonl             attributes + geometry of every picture (ground truth)
    vqa_{train,eval}.json                   LLaVA-Instruct conversations about the pictures
    alpaca_train.json                       text-only instructions (Alpaca) about the world
    caption_reading_train.json              text-only caption exercises: the picture in words, then a caption
    reading_train.json                      text-only reading exercises (LLaVA json without images): the
                                            VQA conversations about pictures that are described in words
                                            where the image would be, the attributes in random order
                                            ("circle, red, on the left, large.", see `words_for`)
    eval_vqa.jsonl                          held-out multiple-choice VQA: image, question, answer, choices, kind
    eval_captions.jsonl                     held-out captions: image, caption, reference description
    tokenizer.model                         a LLaMA-style SentencePiece BPE (byte fallback) trained on all text
    manifest.json                           parameters, relative paths, counts, chance levels

Answers use a small closed vocabulary, always the same form: colours "red.", shapes "a circle.", sizes
"large.", positions "on the left." / "at the top." / "in the center.", counts "one." / "two.", and
"Describe the picture." -> "a large red circle on the left.". `CHOICES` lists every kind's candidates;
`eval_vqa.jsonl` carries them per record for multiple-choice scoring (chance = 1 / len(choices)).

Everything is a pure function of the parameters (per-picture RNGs seeded by (seed, split, index)), files
are written byte-for-byte reproducibly (tar mtimes fixed, single-threaded SentencePiece training), and
`make_world` returns at once when the folder already holds a world with the same parameters.

Note for stage-1 training: the caption pipeline's training augmentation flips images horizontally half
of the time, which makes "left"/"right" in captions wrong for the flipped copies (colour and shape are
flip-invariant: every shape here is left-right symmetric).

CLI: `python -m data_pipelines.synthetic --out DIR [--seed N] [--train-pictures N] [--eval-pictures N]
[--image-size N] [--vocab-size N] [--force]` prints the manifest (json).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
import random
import shutil
import struct
import sys
import time
import zlib
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

from data_pipelines.conversation import SYSTEM_PROMPT
from data_pipelines.writer import ShardWriter

VERSION = 3  # bump when the generated content changes: invalidates existing worlds

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 45, 45),
    "green": (50, 180, 70),
    "blue": (55, 95, 235),
    "yellow": (235, 215, 50),
    "purple": (150, 70, 200),
    "orange": (245, 140, 35),
    "white": (235, 235, 235),
}
COLOURS_LIST = tuple(COLOURS)
SHAPES = ("circle", "square", "triangle", "star", "cross")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
BACKGROUNDS = ("dark", "gray")
POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top",
                    "bottom": "at the bottom", "center": "in the center"}
_POSITION_LONG = {"left": "on the left side of the picture", "right": "on the right side of the picture",
                  "top": "at the top of the picture", "bottom": "at the bottom of the picture",
                  "center": "in the center of the picture"}
_POSITION_XY = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73),
                "center": (0.5, 0.5)}
_RADIUS = {"small": 0.11, "large": 0.21}  # fraction of the image side
_TWO_SHAPE_PAIRS = (("left", "right"), ("top", "bottom"))
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")

#: Candidate answers of every question kind (the exact answer strings).
CHOICES: dict[str, list[str]] = {
    "colour": [f"{c}." for c in COLOURS],
    "shape": [f"a {s}." for s in SHAPES],
    "size": [f"{s}." for s in SIZES],
    "position": [f"{POSITION_PHRASES[p]}." for p in POSITIONS],
    "count": ["one.", "two."],
}
EVAL_KINDS = tuple(CHOICES)
_SPLIT_CODE = {"train": 1, "eval": 2}


# ----------------------------------------------------------------------------------------------------
# Pictures
# ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Shape:
    colour: str
    shape: str
    size: str
    position: str
    cx: float  # centre in pixels
    cy: float
    radius: float  # pixels
    rgb: tuple[int, int, int]  # the drawn colour (palette colour + jitter)


@dataclasses.dataclass(frozen=True)
class Picture:
    split: str
    index: int
    background: str
    shapes: tuple[Shape, ...]

    @property
    def key(self) -> str:
        return f"{self.split}-{self.index:06d}"

    @property
    def image(self) -> str:
        """Path relative to the image root."""
        return f"{self.split}/{self.index:06d}.png"

    def to_json(self) -> dict:
        return {"key": self.key, "image": self.image, "background": self.background,
                "shapes": [{f.name: getattr(s, f.name) for f in dataclasses.fields(Shape)} for s in self.shapes]}


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _noun(s: Shape, size: bool = False) -> str:
    return f"{s.size} {s.colour} {s.shape}" if size else f"{s.colour} {s.shape}"


def describe(picture: Picture) -> str:
    """The canonical description: 'a large red circle on the left' (two shapes joined by 'and')."""
    return " and ".join(f"{_article(_noun(s, True))} {POSITION_PHRASES[s.position]}" for s in picture.shapes)


def _picture_rng(seed: int, split: str, index: int) -> random.Random:
    return random.Random(f"{seed}/{split}/{index}/picture")


def sample_picture(seed: int, split: str, index: int, image_size: int, two_shape_fraction: float) -> Picture:
    """The attributes and geometry of picture `index` of `split` (a pure function of its arguments)."""
    rng = _picture_rng(seed, split, index)
    n = 2 if rng.random() < two_shape_fraction else 1
    colours, shapes = rng.sample(COLOURS_LIST, n), rng.sample(SHAPES, n)
    if n == 1:
        positions, sizes = [rng.choice(POSITIONS)], [rng.choice(SIZES)]
    else:
        positions = list(rng.choice(_TWO_SHAPE_PAIRS))
        rng.shuffle(positions)
        sizes = [rng.choice(SIZES), rng.choice(SIZES)]
        if sizes == ["large", "large"]:  # two large shapes could touch
            sizes[rng.randrange(2)] = "small"
    out = []
    jitter = 0.035 * image_size
    for colour, shape, size, position in zip(colours, shapes, sizes, positions):
        fx, fy = _POSITION_XY[position]
        cx = fx * image_size + rng.uniform(-jitter, jitter)
        cy = fy * image_size + rng.uniform(-jitter, jitter)
        radius = _RADIUS[size] * image_size * rng.uniform(0.9, 1.1)
        rgb = tuple(min(255, max(0, v + rng.randint(-12, 12))) for v in COLOURS[colour])
        out.append(Shape(colour, shape, size, position, round(cx, 3), round(cy, 3), round(radius, 3), rgb))
    return Picture(split, index, rng.choice(BACKGROUNDS), tuple(out))


def shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Outline of a polygonal shape (all shapes but the circle) of 'radius' r centred at (cx, cy)."""
    if shape == "square":
        h = 0.85 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        rr = 1.1 * r
        return [(cx + rr * math.cos(a), cy + rr * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "star":
        rr = 1.1 * r
        return [(cx + (rr if k % 2 == 0 else 0.45 * rr) * math.cos(-math.pi / 2 + k * math.pi / 5),
                 cy + (rr if k % 2 == 0 else 0.45 * rr) * math.sin(-math.pi / 2 + k * math.pi / 5))
                for k in range(10)]
    if shape == "cross":
        t = 0.3 * r
        return [(cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t), (cx + r, cy + t),
                (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r), (cx - t, cy + t), (cx - r, cy + t),
                (cx - r, cy - t), (cx - t, cy - t)]
    raise ValueError(f"unknown shape {shape!r}")


def shape_mask(s: Shape, image_size: int) -> np.ndarray:
    """Boolean [image_size, image_size] mask of one shape."""
    mask = Image.new("L", (image_size, image_size), 0)
    draw = ImageDraw.Draw(mask)
    if s.shape == "circle":
        draw.ellipse([s.cx - s.radius, s.cy - s.radius, s.cx + s.radius, s.cy + s.radius], fill=255)
    else:
        draw.polygon(shape_polygon(s.shape, s.cx, s.cy, s.radius), fill=255)
    return np.asarray(mask) > 127


def render_picture(picture: Picture, seed: int, image_size: int) -> np.ndarray:
    """[image_size, image_size, 3] uint8 pixels of `picture` (deterministic): background level (dark
    15-55 or gray 85-125) with a slight tint and linear ramp, shapes in their jittered colour, and
    per-pixel noise (±5 on the background, ±2 on shapes) everywhere."""
    rng = random.Random(f"{seed}/{picture.split}/{picture.index}/pixels")
    lo = 15 if picture.background == "dark" else 85
    level = lo + rng.randint(0, 40)
    base = np.asarray([level + rng.randint(-5, 5) for _ in range(3)], np.int16)  # slight tint
    slope = rng.uniform(-10, 10)
    ramp = np.linspace(-slope, slope, image_size)
    ramp = np.rint(ramp).astype(np.int16)[:, None, None] if rng.random() < 0.5 else \
        np.rint(ramp).astype(np.int16)[None, :, None]
    noise = np.frombuffer(rng.randbytes(image_size * image_size * 3), np.uint8).reshape(image_size, image_size, 3)
    noise = (noise % 11).astype(np.int16) - 5
    img = base + ramp + noise
    for s in picture.shapes:
        mask = shape_mask(s, image_size)
        img[mask] = np.asarray(s.rgb, np.int16) + noise[mask] // 2
    return np.clip(img, 0, 255).astype(np.uint8)


def encode_png(pixels: np.ndarray, level: int = 1) -> bytes:
    """An 8-bit RGB PNG of `pixels` [h, w, 3] (filter 0, zlib `level`): several times faster than PIL's
    adaptive-filter encoder for these small noisy pictures, and byte-stable."""
    h, w, _ = pixels.shape
    raw = np.zeros((h, w * 3 + 1), np.uint8)
    raw[:, 1:] = pixels.reshape(h, w * 3)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw.tobytes(), level)) + chunk(b"IEND", b""))


# ----------------------------------------------------------------------------------------------------
# Text: captions, questions, instructions
# ----------------------------------------------------------------------------------------------------

_CAPTIONS_ONE = (
    lambda s, p: f"{_article(_noun(s))} {POSITION_PHRASES[s.position]}",
    lambda s, p: f"{_article(_noun(s, True))} {_POSITION_LONG[s.position]}",
    lambda s, p: f"a picture of {_article(_noun(s, True))} {POSITION_PHRASES[s.position]}",
    lambda s, p: f"{_article(_noun(s))} on a {p.background} background",
    lambda s, p: f"there is {_article(_noun(s, True))} {POSITION_PHRASES[s.position]}",
    lambda s, p: f"{_article(s.size + ' ' + s.shape)} coloured {s.colour}, {POSITION_PHRASES[s.position]}",
    lambda s, p: f"{_article(_noun(s, True))}",
)
_CAPTIONS_TWO = (
    lambda a, b, p: f"{_article(_noun(a))} {POSITION_PHRASES[a.position]} and {_article(_noun(b))} "
                    f"{POSITION_PHRASES[b.position]}",
    lambda a, b, p: f"two shapes: {describe(p)}",
    lambda a, b, p: f"a picture of {describe(p)}",
    lambda a, b, p: f"{_article(_noun(a))} and {_article(_noun(b))} on a {p.background} background",
)


def caption(picture: Picture, rng: random.Random) -> str:
    if len(picture.shapes) == 1:
        return rng.choice(_CAPTIONS_ONE)(picture.shapes[0], picture)
    a, b = picture.shapes
    return rng.choice(_CAPTIONS_TWO)(a, b, picture)


def _answer(kind: str, s: Shape, picture: Picture) -> str:
    if kind == "colour":
        return f"{s.colour}."
    if kind == "shape":
        return f"a {s.shape}."
    if kind == "size":
        return f"{s.size}."
    if kind == "position":
        return f"{POSITION_PHRASES[s.position]}."
    if kind == "count":
        return f"{NUMBERS[len(picture.shapes)]}."
    if kind == "describe":
        return f"{describe(picture)}."
    raise ValueError(kind)


def question(kind: str, picture: Picture, rng: random.Random) -> tuple[str, str]:
    """(question, answer) of one kind about `picture`; with two shapes, about one of them (named by its
    position, or by its shape/colour, which differ between the two)."""
    s = rng.choice(picture.shapes)
    if len(picture.shapes) == 1:
        ref = rng.choice(("the shape", "the shape", "the object", f"the {s.shape}"))
        templates = {
            "colour": ("What colour is the shape?", "What is the colour of the shape?",
                       f"Which colour is the {s.shape}?", f"What colour is the {s.shape} in the picture?",
                       "Tell me the colour of the shape."),
            "shape": ("What shape is in the picture?", "What shape is it?", "Which shape do you see?",
                      f"What kind of shape is the {s.colour} object?"),
            "size": (f"Is {ref} small or large?", f"How big is the {s.shape}?",
                     f"Is the {s.colour} shape large or small?"),
            "position": ("Where is the shape?", f"Where is the {_noun(s)}?",
                         "In which part of the picture is the shape?"),
        }
    else:
        where = POSITION_PHRASES[s.position]
        templates = {
            "colour": (f"What colour is the shape {where}?", f"What colour is the {s.shape}?",
                       f"What is the colour of the shape {where}?"),
            "shape": (f"What shape is {where}?", f"What shape is the {s.colour} one?",
                      f"Which shape do you see {where}?"),
            "size": (f"Is the shape {where} small or large?", f"How big is the {_noun(s)}?"),
            "position": (f"Where is the {_noun(s)}?", f"Where is the {s.shape}?"),
        }
    templates["count"] = ("How many shapes are in the picture?", "How many shapes can you see?",
                          "How many shapes are there?")
    templates["describe"] = ("Describe the picture.", "What is in the picture?", "What do you see?")
    return rng.choice(templates[kind]), _answer(kind, s, picture)


_TRAIN_KIND_WEIGHTS = {"colour": 3, "shape": 3, "position": 2, "size": 1, "count": 1, "describe": 1}


def conversation(picture: Picture, rng: random.Random, multi_turn_fraction: float, uid: str) -> dict:
    """A LLaVA-Instruct record about `picture`: 1 turn, or 2-3 with probability `multi_turn_fraction`."""
    n = 1 if rng.random() >= multi_turn_fraction else rng.choice((2, 3))
    kinds, weights = list(_TRAIN_KIND_WEIGHTS), list(_TRAIN_KIND_WEIGHTS.values())
    chosen = []
    for _ in range(n):
        k = rng.choices(kinds, weights)[0]
        i = kinds.index(k)
        kinds.pop(i), weights.pop(i)
        chosen.append(k)
    messages = []
    for t, kind in enumerate(chosen):
        q, a = question(kind, picture, rng)
        messages += [{"from": "human", "value": ("<image>\n" + q) if t == 0 else q}, {"from": "gpt", "value": a}]
    return {"id": uid, "image": picture.image, "conversations": messages}


_MIXES = {("red", "blue"): "purple", ("red", "yellow"): "orange", ("blue", "yellow"): "green",
          ("black", "white"): "gray"}
_THINGS = {"the sky": "blue", "grass": "green", "snow": "white", "a banana": "yellow", "a strawberry": "red",
           "an orange": "orange", "a grape": "purple", "a lemon": "yellow", "a tomato": "red", "a leaf": "green",
           "milk": "white", "a plum": "purple"}
_OPPOSITES = {"large": "small", "small": "large", "left": "right", "right": "left", "top": "bottom",
              "bottom": "top", "dark": "light", "light": "dark"}
_SIDES = (("How many sides does a triangle have?", "three."), ("How many sides does a square have?", "four."),
          ("How many corners does a triangle have?", "three."), ("How many corners does a square have?", "four."),
          ("How many corners does a circle have?", "none."), ("How many points does a star have?", "five."),
          ("How many arms does a cross have?", "four."))


def words_for(picture: Picture, rng: random.Random) -> str:
    """The picture as the reading exercises put it where the image will be: each shape's size, colour,
    shape and position phrase in random order ("circle, large, purple, at the top; blue, cross, small, at
    the bottom.").

    Why not the canonical sentence: stage 1 teaches the vision side to make the frozen LLM read the
    picture from 9 visual tokens, and the LLM reads them with the circuits it learned here. Taught only on
    "a large red circle on the left", it can recall the shape as "the word after the colour", a pattern
    over several tokens in a fixed order that the vision side does not learn to imitate. With the
    attributes in any order the LLM has to find each one by what the word is, which any visual token can
    carry. Measured on the demo (with world_caption_reading and the conversation caption template):
    stage-2 shape 24% -> 48%, caption matching 71% -> 92%; with stage 1 at a gentler learning rate, shape
    and position far above chance (docs/benchmarks.md, "Demo"). One word per position ("left") instead of
    the phrase did worse (shape 34%)."""
    groups = []
    for s in picture.shapes:
        parts = [s.size, s.colour, s.shape, POSITION_PHRASES[s.position]]
        rng.shuffle(parts)
        groups.append(", ".join(parts))
    rng.shuffle(groups)
    return "; ".join(groups) + "."


def reading_conversation(picture: Picture, rng: random.Random, multi_turn_fraction: float, uid: str) -> dict:
    """A text-only LLaVA record: the picture in words (`words_for`), then VQA turns about it. Reading
    comprehension is what lets a frozen LLM use visual tokens at all: stage 1 only has to teach the
    vision side to "say" the picture in a form the LLM already knows how to answer questions about."""
    record = conversation(picture, rng, multi_turn_fraction, uid)
    first = record["conversations"][0]
    first["value"] = first["value"].replace("<image>", words_for(picture, rng), 1)
    del record["image"]
    return record


def caption_reading(picture: Picture, rng: random.Random, uid: str) -> dict:
    """A text-only LLaVA record in the form of a stage-1 caption sample (`Human: <image>\\nAI: {caption}`,
    configs/demo_stage1.yaml) with the picture in words where the image will be: it teaches the LLM, before
    it is frozen, to write a caption from what precedes it."""
    return {"id": uid, "conversations": [{"from": "human", "value": words_for(picture, rng)},
                                         {"from": "gpt", "value": caption(picture, rng)}]}


def _instr_mix(rng):
    (a, b), c = rng.choice(list(_MIXES.items()))
    if rng.random() < 0.5:
        a, b = b, a
    q = rng.choice((f"What colour do you get by mixing {a} and {b}?",
                    f"If you mix {a} paint and {b} paint, what colour do you get?"))
    return q, "", f"{c}."


def _instr_thing(rng):
    thing, c = rng.choice(list(_THINGS.items()))
    return rng.choice((f"What colour is {thing}?", f"Which colour is {thing} usually?")), "", f"{c}."


def _instr_sides(rng):
    q, a = rng.choice(_SIDES)
    return q, "", a


def _world_words():
    return list(COLOURS) + list(SHAPES)


def _instr_count(rng):
    words = [rng.choice(_world_words()) for _ in range(rng.randint(1, 7))]
    if rng.random() < 0.5:
        return "How many words are in the list?", ", ".join(words), f"{NUMBERS[len(words)]}."
    n = sum(w in COLOURS for w in words)
    return "How many colours are in the list?", ", ".join(words), f"{NUMBERS[n]}."


def _instr_spell(rng):
    w = rng.choice(_world_words())
    r = rng.random()
    if r < 0.4:
        return rng.choice((f"Spell the word {w}.", f"How do you spell {w}?")), "", "-".join(w) + "."
    if r < 0.7:
        return f"How many letters are in the word {w}?", "", f"{NUMBERS[len(w)]}."
    return f"What is the first letter of the word {w}?", "", f"{w[0]}."


def _instr_category(rng):
    w = rng.choice(_world_words())
    if rng.random() < 0.5:
        return f"Is {w} a colour or a shape?", "", "a colour." if w in COLOURS else "a shape."
    c, s = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    items = [c, s] if rng.random() < 0.5 else [s, c]
    if rng.random() < 0.5:
        return "Which word in the list is a shape?", ", ".join(items), f"{s}."
    return "Which word in the list is a colour?", ", ".join(items), f"{c}."


def _instr_opposite(rng):
    w, o = rng.choice(list(_OPPOSITES.items()))
    return rng.choice((f"What is the opposite of {w}?", f"What is the opposite of the word {w}?")), "", f"{o}."


_INSTRUCTIONS = (_instr_mix, _instr_thing, _instr_sides, _instr_count, _instr_spell, _instr_category,
                 _instr_opposite)


def text_instruction(rng: random.Random) -> dict:
    instruction, extra, output = rng.choice(_INSTRUCTIONS)(rng)
    return {"instruction": instruction, "input": extra, "output": output}


# ----------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------

def train_tokenizer(lines: Sequence[str], vocab_size: int) -> bytes:
    """A LLaMA-style SentencePiece model (BPE, byte fallback, split digits, unk/bos/eos = 0/1/2, no pad)
    trained on `lines`; deterministic (one thread, no sampling or shuffling of the input)."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, split_digits=True, character_coverage=1.0, normalization_rule_name="identity",
        add_dummy_prefix=True, remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, input_sentence_size=0,
        shuffle_input_sentence=False, max_sentence_length=16384, minloglevel=2)
    return model.getvalue()


# ----------------------------------------------------------------------------------------------------
# The world
# ----------------------------------------------------------------------------------------------------

class _ReproducibleShardWriter(ShardWriter):
    """ShardWriter with fixed member mtimes, so shards are byte-identical across runs."""

    def _add(self, name: str, data: bytes) -> None:
        import tarfile

        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        self._tar.format = tarfile.USTAR_FORMAT  # plain headers: names here are short ASCII
        self._tar.addfile(info, io.BytesIO(data))


_MARKER = ".owl_synthetic_world"
_OWNED = ("images", "captions", "pictures_train.jsonl", "pictures_eval.jsonl", "vqa_train.json",
          "vqa_eval.json", "alpaca_train.json", "reading_train.json", "caption_reading_train.json", "eval_vqa.jsonl", "eval_captions.jsonl", "tokenizer.model",
          "manifest.json")


def _conversation_lines(record: dict) -> list[str]:
    """Text lines of a LLaVA record as the official format renders them (for tokenizer training)."""
    lines = []
    for m in record["conversations"]:
        label = "Human" if m["from"] == "human" else "AI"
        lines += [f"{label}: {t}" for t in m["value"].replace("<image>", "").split("\n") if t.strip()]
    return lines


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_jsonl(path: Path, records: Sequence[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def _shard_pattern(prefix: str, paths: Sequence[str]) -> str:
    return f"{prefix}-{{{0:06d}..{len(paths) - 1:06d}}}.tar"


def _absolute(manifest: dict, root: Path) -> dict:
    out = dict(manifest)
    out["root"] = str(root)
    for key, rel in manifest["paths"].items():
        out[key] = [str(root / p) for p in rel] if isinstance(rel, list) else str(root / rel)
    return out


def _load_existing(root: Path, params: dict) -> Optional[dict]:
    path = root / "manifest.json"
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("params") != params:
        return None
    for rel in manifest.get("paths", {}).values():
        for p in rel if isinstance(rel, list) else [rel]:
            if "{" not in p and not (root / p).exists():
                return None
    return manifest


def make_world(out_dir: str | os.PathLike, *, seed: int = 0, num_train_pictures: int = 2000,
               num_eval_pictures: int = 200, image_size: int = 64, two_shape_fraction: float = 0.15,
               multi_turn_fraction: float = 0.4, num_text_instructions: int = 1000,
               num_reading_conversations: int = 2000, num_caption_readings: int = 6000, vocab_size: int = 512,
               samples_per_shard: int = 500, force: bool = False) -> dict:
    """Generate the demo world under `out_dir` (or reuse the one there made with the same parameters)
    and return its manifest with absolute paths:

    root, image_root, captions_train / captions_eval (brace shard patterns), captions_train_shards /
    captions_eval_shards (lists), pictures_train / pictures_eval (jsonl ground truth), vqa_train /
    vqa_eval (LLaVA json), alpaca_train (Alpaca json), eval_vqa (jsonl), eval_captions (jsonl), tokenizer
    (tokenizer.model); plus params, counts, choices, chance (1/len(choices) per kind), majority (share of
    the most frequent gold answer per kind in eval_vqa) and `reused` (True when nothing was generated).
    """
    if image_size < 32:  # below ~48 pixels small stars and crosses start to look alike
        raise ValueError(f"image_size must be at least 32, got {image_size}")
    if num_train_pictures < 1 or num_eval_pictures < 1:
        raise ValueError("need at least one train and one eval picture")
    params = {"version": VERSION, "seed": seed, "num_train_pictures": num_train_pictures,
              "num_eval_pictures": num_eval_pictures, "image_size": image_size,
              "two_shape_fraction": two_shape_fraction, "multi_turn_fraction": multi_turn_fraction,
              "num_text_instructions": num_text_instructions,
              "num_reading_conversations": num_reading_conversations,
              "num_caption_readings": num_caption_readings, "vocab_size": vocab_size,
              "samples_per_shard": samples_per_shard}
    root = Path(out_dir).resolve()
    if not force:
        existing = _load_existing(root, params)
        if existing is not None:
            return {**_absolute(existing, root), "reused": True}

    # Own the folder: clear what an earlier world left, refuse to overwrite anything else.
    root.mkdir(parents=True, exist_ok=True)
    if (root / _MARKER).exists() or (root / "manifest.json").exists():
        for name in _OWNED:
            p = root / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    else:
        clash = [n for n in _OWNED if (root / n).exists()]
        if clash:
            raise FileExistsError(f"{root} holds {clash} but no synthetic world marker; not overwriting")
    (root / _MARKER).write_text("owl-jax synthetic demo world\n")
    (root / "captions").mkdir()

    corpus: list[str] = [SYSTEM_PROMPT]
    paths: dict[str, Any] = {"image_root": "images"}
    counts: dict[str, int] = {}
    for split, n in (("train", num_train_pictures), ("eval", num_eval_pictures)):
        (root / "images" / split).mkdir(parents=True)
        pictures, conversations, eval_records, eval_captions = [], [], [], []
        def draw(i: int, split=split) -> tuple[Picture, bytes]:
            pic = sample_picture(seed, split, i, image_size, two_shape_fraction)
            png = encode_png(render_picture(pic, seed, image_size))
            (root / "images" / pic.image).write_bytes(png)
            return pic, png

        with _ReproducibleShardWriter(str(root / "captions" / f"{split}-%06d.tar"), samples_per_shard) as w:
            for i in range(n):
                pic, png = draw(i)
                rng = random.Random(f"{seed}/{split}/{i}/text")
                cap = caption(pic, rng)
                w.write_caption(pic.key, png, cap, {"image": pic.image, "description": describe(pic)},
                                image_format="png")
                pictures.append({**pic.to_json(), "caption": cap})
                conv = conversation(pic, rng, multi_turn_fraction, f"synth-{pic.key}")
                conversations.append(conv)
                corpus.append(cap)
                corpus += _conversation_lines(conv)
                if split == "eval":
                    eval_captions.append({"key": pic.key, "image": pic.image, "caption": cap,
                                          "description": describe(pic)})
                    for kind in EVAL_KINDS:
                        q, a = question(kind, pic, rng)
                        eval_records.append({"id": f"{pic.key}-{kind}", "image": pic.image, "question": q,
                                             "answer": a, "choices": list(CHOICES[kind]), "kind": kind})
        shards = [os.path.relpath(p, root) for p in w.paths]
        paths[f"captions_{split}"] = _shard_pattern(f"captions/{split}", shards)
        paths[f"captions_{split}_shards"] = shards
        paths[f"pictures_{split}"] = f"pictures_{split}.jsonl"
        paths[f"vqa_{split}"] = f"vqa_{split}.json"
        _write_jsonl(root / f"pictures_{split}.jsonl", pictures)
        _write_json(root / f"vqa_{split}.json", conversations)
        counts[f"{split}_pictures"] = n
        counts[f"captions_{split}"] = n
        counts[f"vqa_{split}_conversations"] = len(conversations)
        counts[f"vqa_{split}_turns"] = sum(len(c["conversations"]) // 2 for c in conversations)
        counts[f"two_shape_{split}_pictures"] = sum(len(p["shapes"]) == 2 for p in pictures)
    _write_jsonl(root / "eval_vqa.jsonl", eval_records)
    _write_jsonl(root / "eval_captions.jsonl", eval_captions)
    paths.update(eval_vqa="eval_vqa.jsonl", eval_captions="eval_captions.jsonl")

    rng = random.Random(f"{seed}/alpaca")
    alpaca = [text_instruction(rng) for _ in range(num_text_instructions)]
    for rec in alpaca:
        corpus += [f"Human: {rec['instruction']}", *rec["input"].split("\n"), f"AI: {rec['output']}"]
    _write_json(root / "alpaca_train.json", alpaca)
    paths["alpaca_train"] = "alpaca_train.json"
    counts["alpaca_train"] = len(alpaca)
    counts["eval_vqa"] = len(eval_records)

    reading = []
    for i in range(num_reading_conversations):  # imaginary pictures of their own split: never rendered
        pic = sample_picture(seed, "reading", i, image_size, two_shape_fraction)
        rec = reading_conversation(pic, random.Random(f"{seed}/reading/{i}/text"), multi_turn_fraction,
                                   f"reading-{i:06d}")
        reading.append(rec)
        corpus += _conversation_lines(rec)
    _write_json(root / "reading_train.json", reading)
    paths["reading_train"] = "reading_train.json"
    counts["reading_train"] = len(reading)

    caption_readings = []
    for i in range(num_caption_readings):  # imaginary pictures too, of their own split
        pic = sample_picture(seed, "caption_reading", i, image_size, two_shape_fraction)
        rec = caption_reading(pic, random.Random(f"{seed}/caption_reading/{i}/text"), f"caption-reading-{i:06d}")
        caption_readings.append(rec)
        corpus += _conversation_lines(rec)
    _write_json(root / "caption_reading_train.json", caption_readings)
    paths["caption_reading_train"] = "caption_reading_train.json"
    counts["caption_reading_train"] = len(caption_readings)

    corpus += [f"{k} {a}" for k, answers in CHOICES.items() for a in answers]  # every answer is in the text
    corpus.append("0 1 2 3 4 5 6 7 8 9 , . ; : ! ? ' \" ( ) - + = / " + " ".join("ABCDEFGHIJKLMNOPQRSTUVWXYZ"))
    (root / "tokenizer.model").write_bytes(train_tokenizer([l for l in corpus if l.strip()], vocab_size))
    paths["tokenizer"] = "tokenizer.model"

    per_kind = {k: [r["answer"] for r in eval_records if r["kind"] == k] for k in EVAL_KINDS}
    counts.update({f"eval_vqa_{k}": len(v) for k, v in per_kind.items()})
    manifest = {
        "params": params,
        "paths": paths,
        "counts": counts,
        "choices": CHOICES,
        "chance": {k: 1.0 / len(CHOICES[k]) for k in EVAL_KINDS},
        "majority": {k: (max(v.count(a) for a in set(v)) / len(v)) if v else 0.0 for k, v in per_kind.items()},
    }
    tmp = root / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, root / "manifest.json")
    return {**_absolute(manifest, root), "reused": False}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description="Generate the synthetic coloured-shapes demo world.")
    p.add_argument("--out", required=True, help="world folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-pictures", type=int, default=2000)
    p.add_argument("--eval-pictures", type=int, default=200)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--two-shape-fraction", type=float, default=0.15)
    p.add_argument("--multi-turn-fraction", type=float, default=0.4)
    p.add_argument("--text-instructions", type=int, default=1000)
    p.add_argument("--reading-conversations", type=int, default=2000)
    p.add_argument("--caption-readings", type=int, default=6000)
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--samples-per-shard", type=int, default=500)
    p.add_argument("--force", action="store_true", help="regenerate even if an identical world exists")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    world = make_world(a.out, seed=a.seed, num_train_pictures=a.train_pictures, num_eval_pictures=a.eval_pictures,
                       image_size=a.image_size, two_shape_fraction=a.two_shape_fraction,
                       multi_turn_fraction=a.multi_turn_fraction, num_text_instructions=a.text_instructions,
                       num_reading_conversations=a.reading_conversations, num_caption_readings=a.caption_readings,
                       vocab_size=a.vocab_size, samples_per_shard=a.samples_per_shard, force=a.force)
    print(json.dumps(world, indent=1))
    print(f"{'reused' if world['reused'] else 'generated'} in {time.perf_counter() - t0:.2f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
