"""The synthetic demo world (data_pipelines/synthetic.py): determinism, formats the pipelines read, and
answers that match the pixels (re-derived from the PNGs without the generator's geometry)."""

import io
import json
import os
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipelines import synthetic as S
from data_pipelines.conversation import IMAGE_TAG, read_record, render
from data_pipelines.shards import expand_sources, open_shard
from data_pipelines.tokenizers import SentencePieceTokenizer, load_tokenizer

SMALL = dict(num_train_pictures=40, num_eval_pictures=20, num_text_instructions=60, num_reading_conversations=30,
             num_caption_readings=30)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    base = tmp_path_factory.mktemp("worlds")
    return {name: S.make_world(base / name, seed=seed, **SMALL)
            for name, seed in (("a", 0), ("b", 0), ("c", 1))}


@pytest.fixture(scope="module")
def world(worlds):
    return worlds["a"]


# ---------------------------------------------------------------- determinism, idempotency, CLI

def test_same_seed_same_bytes_different_seed_different(worlds):
    a, b, c = (_files(Path(worlds[k]["root"])) for k in "abc")
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []
    assert a.keys() == c.keys()
    differ = {k for k in a if a[k] != c[k]}
    for key in ("images/train/000000.png", "images/eval/000000.png", "captions/train-000000.tar",
                "vqa_train.json", "alpaca_train.json", "eval_vqa.jsonl", "pictures_train.jsonl"):
        assert key in differ


def test_eval_pictures_are_not_train_pictures(world):
    root = Path(world["image_root"])
    train = {p.read_bytes() for p in (root / "train").glob("*.png")}
    evals = {p.read_bytes() for p in (root / "eval").glob("*.png")}
    assert len(train) == SMALL["num_train_pictures"] and len(evals) == SMALL["num_eval_pictures"]
    assert not train & evals


def test_idempotent_and_regenerates_on_change(tmp_path):
    out = tmp_path / "w"
    first = S.make_world(out, num_train_pictures=6, num_eval_pictures=3, num_text_instructions=5, num_caption_readings=10)
    assert first["reused"] is False
    stamp = (out / "manifest.json").stat().st_mtime_ns, (out / "images/train/000000.png").stat().st_mtime_ns
    again = S.make_world(out, num_train_pictures=6, num_eval_pictures=3, num_text_instructions=5, num_caption_readings=10)
    assert again["reused"] is True
    assert {k: v for k, v in again.items() if k != "reused"} == {k: v for k, v in first.items() if k != "reused"}
    assert ((out / "manifest.json").stat().st_mtime_ns, (out / "images/train/000000.png").stat().st_mtime_ns) == stamp
    # Fewer pictures: regenerated, and nothing of the bigger world is left behind.
    smaller = S.make_world(out, num_train_pictures=4, num_eval_pictures=3, num_text_instructions=5, num_caption_readings=10)
    assert smaller["reused"] is False
    assert len(list((out / "images/train").glob("*.png"))) == 4
    assert S.make_world(out, num_train_pictures=4, num_eval_pictures=3, num_text_instructions=5, num_caption_readings=10,
                        force=True)["reused"] is False
    # A folder holding someone else's files of the same names is not overwritten.
    foreign = tmp_path / "foreign"
    (foreign / "images").mkdir(parents=True)
    with pytest.raises(FileExistsError):
        S.make_world(foreign, num_train_pictures=2, num_eval_pictures=1)


def test_cli_prints_manifest(tmp_path, capsys):
    out = tmp_path / "cli"
    assert S.main(["--out", str(out), "--seed", "3", "--train-pictures", "5", "--eval-pictures", "2",
                   "--text-instructions", "4", "--image-size", "48"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["params"]["seed"] == 3 and printed["params"]["image_size"] == 48
    assert printed["counts"]["train_pictures"] == 5 and printed["counts"]["eval_vqa"] == 2 * len(S.EVAL_KINDS)
    assert Path(printed["tokenizer"]).is_file() and Path(printed["vqa_train"]).is_file()
    assert Image.open(Path(printed["image_root"]) / "train/000004.png").size == (48, 48)


# ---------------------------------------------------------------- formats

def test_caption_shards(world):
    pictures = {p["key"]: p for p in _jsonl(world["pictures_train"]) + _jsonl(world["pictures_eval"])}
    for split, n in (("train", SMALL["num_train_pictures"]), ("eval", SMALL["num_eval_pictures"])):
        shards = world[f"captions_{split}_shards"]
        assert expand_sources(world[f"captions_{split}"]) == shards
        samples = {}
        for path in shards:
            with tarfile.open(path) as tar:
                for member in tar.getmembers():
                    key, ext = member.name.rsplit(".", 1)
                    samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
        assert len(samples) == n
        for key, files in samples.items():
            assert set(files) == {"png", "txt", "json"}
            caption = files["txt"].decode()
            assert caption == pictures[key]["caption"] and caption.strip()
            assert json.loads(files["json"])["caption"] == caption
            image = Image.open(io.BytesIO(files["png"]))
            assert image.size == (64, 64) and image.mode == "RGB"
            assert files["png"] == (Path(world["image_root"]) / pictures[key]["image"]).read_bytes()
        # The caption pipeline's tar index sees the same samples.
        assert sum(len(open_shard(p).samples) for p in shards) == n


def test_llava_records_parse(world):
    root = Path(world["image_root"])
    for split in ("train", "eval"):
        records = json.loads(Path(world[f"vqa_{split}"]).read_text())
        assert len(records) == SMALL[f"num_{split}_pictures"]
        assert any(len(r["conversations"]) > 2 for r in records)  # some multi-turn
        for r in records:
            conv = read_record(r, "llava")
            assert conv.images == (r["image"],) and (root / r["image"]).is_file()
            assert render(conv).count(IMAGE_TAG) == 1
            answers = [m["value"] for m in r["conversations"][1::2]]
            assert all(a.endswith(".") and a == a.lower() for a in answers)


def test_alpaca_records_parse(world):
    records = json.loads(Path(world["alpaca_train"]).read_text())
    assert len(records) == SMALL["num_text_instructions"]
    assert any(r["input"] for r in records) and any(not r["input"] for r in records)
    for r in records:
        conv = read_record(r, "alpaca")
        assert conv.num_images == 0 and conv.turns[-1].text == r["output"]
    facts = {r["instruction"]: r["output"] for r in records}
    for q, a in facts.items():
        if q.startswith("What colour do you get by mixing red and blue"):
            assert a == "purple."
        if q.startswith("Spell the word "):
            assert a == "-".join(q[len("Spell the word "):-1]) + "."


def test_tokenizer_round_trips(world):
    tok = load_tokenizer(world["tokenizer"])
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (512, 1, 2, 0)
    for rec in _jsonl(world["eval_captions"]):
        assert tok.decode(tok.encode(rec["caption"])) == rec["caption"]
    text = render(read_record(json.loads(Path(world["vqa_train"]).read_text())[0], "llava"))
    assert tok.decode(tok.encode(text)) == text
    # Answers are whole pieces, never byte fallback; unseen text still round-trips through bytes.
    for answers in S.CHOICES.values():
        for a in answers:
            assert not any(tok._sp.id_to_piece(i).startswith("<0x") for i in tok.encode(a))
    assert tok.decode(tok.encode("zebra 42 é")) == "zebra 42 é"


# ---------------------------------------------------------------- answers match the pixels

_PALETTE = np.asarray(list(S.COLOURS.values()), np.float32)
_EXTENT = {"circle": 2.0, "square": 1.7, "triangle": 1.9, "star": 2.1, "cross": 2.0}  # bbox side / radius


def derive_objects(pixels: np.ndarray) -> list[dict]:
    """The shapes of a picture from its pixels alone: pixels within 60 of a palette colour, grouped by
    colour (a picture never repeats a colour); shape from bounding-box fill and vertical mass offset,
    size from the extent, position from the centroid."""
    n = pixels.shape[0]
    dist = np.linalg.norm(pixels[:, :, None, :].astype(np.float32) - _PALETTE, axis=-1)
    nearest, coloured = dist.argmin(-1), dist.min(-1) < 60
    objects = []
    for c in np.unique(nearest[coloured]):
        mask = coloured & (nearest == c)
        if mask.sum() < 15:
            continue
        ys, xs = np.nonzero(mask)
        h, w = np.ptp(ys) + 1, np.ptp(xs) + 1
        fill = mask.sum() / (h * w)
        below = (ys.mean() - ys.min()) / (h - 1) - 0.5  # triangle: mass in the lower part of its box
        shape = ("square" if fill > 0.9 else "circle" if fill > 0.7 else "triangle" if below > 0.1
                 else "star" if fill < 0.47 else "cross")
        cx, cy = xs.mean() / n, ys.mean() / n
        position = min(S._POSITION_XY, key=lambda p: np.hypot(S._POSITION_XY[p][0] - cx, S._POSITION_XY[p][1] - cy))
        size = "large" if max(h, w) / _EXTENT[shape] / n > 0.16 else "small"
        objects.append({"colour": list(S.COLOURS)[c], "shape": shape, "size": size, "position": position})
    return objects


def _referent(question: str, objects: list[dict]) -> dict:
    """The one object a question is about: filter by the position / shape / colour words it mentions."""
    found = objects
    for key, phrases in (("position", {p: S.POSITION_PHRASES[p] for p in S.POSITIONS}),
                         ("shape", {s: s for s in S.SHAPES}), ("colour", {c: c for c in S.COLOURS})):
        named = [v for v, phrase in phrases.items() if f" {phrase}" in question.lower()]
        if named:
            found = [o for o in found if o[key] in named]
    assert len(found) == 1, (question, objects)
    return found[0]


def test_eval_answers_match_pixels(world):
    root = Path(world["image_root"])
    truth = {p["image"]: p for p in _jsonl(world["pictures_eval"])}
    records = _jsonl(world["eval_vqa"])
    assert len(records) == SMALL["num_eval_pictures"] * len(S.EVAL_KINDS)
    cache = {}
    for r in records:
        assert r["answer"] in r["choices"] and r["choices"] == S.CHOICES[r["kind"]]
        if r["image"] not in cache:
            pixels = np.asarray(Image.open(root / r["image"]).convert("RGB"))
            cache[r["image"]] = derive_objects(pixels)
            # The pixels agree with the recorded ground truth.
            recorded = sorted((s["colour"], s["shape"], s["size"], s["position"]) for s in truth[r["image"]]["shapes"])
            seen = sorted((o["colour"], o["shape"], o["size"], o["position"]) for o in cache[r["image"]])
            assert seen == recorded, r["image"]
        objects = cache[r["image"]]
        if r["kind"] == "count":
            assert r["answer"] == f"{S.NUMBERS[len(objects)]}."
            continue
        obj = _referent(r["question"], objects)
        expected = {"colour": f"{obj['colour']}.", "shape": f"a {obj['shape']}.", "size": f"{obj['size']}.",
                    "position": f"{S.POSITION_PHRASES[obj['position']]}."}[r["kind"]]
        assert r["answer"] == expected, (r, objects)


def test_eval_captions_describe_the_pictures(world):
    truth = {p["image"]: p for p in _jsonl(world["pictures_eval"])}
    for rec in _jsonl(world["eval_captions"]):
        for s in truth[rec["image"]]["shapes"]:
            assert s["colour"] in rec["caption"] and s["colour"] in rec["description"]
            assert s["shape"] in rec["description"] and S.POSITION_PHRASES[s["position"]] in rec["description"]


def test_manifest_counts_and_chance(world):
    manifest = json.loads((Path(world["root"]) / "manifest.json").read_text())
    assert manifest["params"]["seed"] == 0 and manifest["params"]["version"] == S.VERSION
    records = _jsonl(world["eval_vqa"])
    for kind in S.EVAL_KINDS:
        of_kind = [r for r in records if r["kind"] == kind]
        assert world["counts"][f"eval_vqa_{kind}"] == len(of_kind) == SMALL["num_eval_pictures"]
        assert world["chance"][kind] == pytest.approx(1 / len(S.CHOICES[kind]))
        answers = [r["answer"] for r in of_kind]
        assert world["majority"][kind] == pytest.approx(max(map(answers.count, answers)) / len(answers))
    assert world["counts"]["alpaca_train"] == SMALL["num_text_instructions"]
    for key in ("vqa_train", "vqa_eval", "alpaca_train", "eval_vqa", "eval_captions", "tokenizer"):
        assert os.path.isabs(world[key]) and Path(world[key]).is_file()


def test_reading_records_describe_an_imaginary_picture_in_words(world):
    records = json.loads(Path(world["reading_train"]).read_text())
    assert len(records) == world["counts"]["reading_train"] > 0
    for r in records:
        conv = read_record(r, "llava")
        assert conv.num_images == 0 and IMAGE_TAG not in render(conv)
        description, question = conv.turns[0].text.split("\n", 1)
        assert description.endswith(".") and question
        answers = [t.text for t in conv.turns[1::2]]
        # every answer about colour/shape/size/position can be read off the description
        for a in answers:
            words = [w for w in a.rstrip(".").split()
                     if w in S.COLOURS or w in S.SHAPES or w in S.SIZES or w in S.POSITIONS]
            assert all(w in description.rstrip(".").replace(",", " ").replace(";", " ").split() for w in words), \
                (description, a)


def test_pictures_in_words_are_the_attributes_in_any_order():
    """The form the frozen LLM learns to read (and the vision side to imitate): the attributes, any order."""
    orders = set()
    for i in range(40):
        pic = S.sample_picture(0, "reading", i, 64, 0.5)
        text = S.words_for(pic, random.Random(i))
        groups = text.rstrip(".").split("; ")
        assert sorted(sorted(g.split(", ")) for g in groups) == sorted(
            sorted([s.size, s.colour, s.shape, S.POSITION_PHRASES[s.position]]) for s in pic.shapes), text
        orders.add(tuple(S.COLOURS_LIST.index(w) if w in S.COLOURS else -1 for w in groups[0].split(", ")))
    assert len(orders) > 3  # the order varies


def test_caption_reading_records_put_the_picture_in_words_before_its_caption(world):
    records = json.loads(Path(world["caption_reading_train"]).read_text())
    assert len(records) == world["counts"]["caption_reading_train"] > 0
    for r in records:
        conv = read_record(r, "llava")
        assert conv.num_images == 0 and len(conv.turns) == 2
        words = set(conv.turns[0].text.rstrip(".").replace(",", " ").replace(";", " ").split())
        caption_words = {w for w in conv.turns[1].text.replace(",", " ").split()
                         if w in S.COLOURS or w in S.SHAPES or w in S.SIZES}
        assert caption_words and caption_words <= words, r
