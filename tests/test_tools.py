"""The data tools: `make_shards` (caption tables and instruction sets -> shards the pipelines read back,
bad rows counted by reason) and `inspect` (decoded samples with every token marked trained / masked /
image slot)."""

import csv
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from data_pipelines import images as image_ops
from data_pipelines import inspect as inspect_tool
from data_pipelines import make_shards
from data_pipelines.captions import CaptionPipeline
from data_pipelines.instructions import InstructionPipeline, InstructionSource
from data_pipelines.tokenizers import ToyWordTokenizer

TOK = ToyWordTokenizer(512)
TPI, SIZE = 9, 56


def colour(i):
    return ((37 * i) % 256, (90 + 53 * i) % 256, (200 + 71 * i) % 256)


def clip(rgb):
    return (np.asarray(rgb, np.float32) / 255.0 - image_ops.CLIP_MEAN) / image_ops.CLIP_STD


def write_images(folder, n, fmts=("png", "jpg", "bmp")):
    """n solid-colour pictures c000.png, c001.jpg, c002.bmp, ... (bmp is re-encoded by make_shards)."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        name = f"c{i:03d}.{fmts[i % len(fmts)]}"
        Image.new("RGB", (40 + i, 30), colour(i)).save(folder / name)
        names.append(name)
    return names


def caption_rows(names):
    """Good rows for every picture, then one bad row per reason."""
    rows = [{"file_name": n, "caption": f"picture number {i}", "license": "cc-by"} for i, n in enumerate(names)]
    bad = [{"file_name": "nope.jpg", "caption": "a missing file", "license": "x"},     # missing_image
           {"file_name": "corrupt.jpg", "caption": "a corrupt file", "license": "x"},  # corrupt_image
           {"file_name": names[0], "caption": "   ", "license": "x"},                 # empty_caption
           {"file_name": "", "caption": "no file name", "license": "x"}]              # no_image_name
    return rows + bad


def write_caption_csv(table, names, extra: str = ""):
    """`caption_rows` as a csv table (header file_name, caption, license), then `extra` raw text."""
    with open(table, "w", newline="") as f:
        w = csv.DictWriter(f, ["file_name", "caption", "license"])
        w.writeheader()
        w.writerows(caption_rows(names))
        f.write(extra)
    return table


EXPECTED_SKIPS = {"missing_image": 1, "corrupt_image": 1, "empty_caption": 1, "no_image_name": 1}


@pytest.fixture()
def picture_dir(tmp_path):
    names = write_images(tmp_path / "img", 6)
    (tmp_path / "img" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return tmp_path, names


def read_back(pattern):
    """{key: (caption, pixels)} of every sample, through the real caption pipeline (eval preprocessing)."""
    p = CaptionPipeline(pattern, tokenizer=TOK, seq_len=24, rows=1, image_budget=1, image_size=SIZE,
                        tokens_per_image=TPI, shuffle=False, train=False, epochs=1)
    out = {}
    while True:
        try:
            key, pixels, tokens, weighted = p.next_sample()
        except StopIteration:
            return out, p.state()["skipped"]
        out[key] = (TOK.decode([int(t) for t, w in zip(tokens, weighted) if w and t != TOK.eos_id]), pixels)


def check_captions(out_dir, names, capsys=None):
    shards = sorted(str(p) for p in out_dir.glob("*.tar"))
    assert shards == [str(out_dir / "00000.tar"), str(out_dir / "00001.tar")]  # 4 samples per shard
    with tarfile.open(shards[0]) as tar:
        members = tar.getnames()
    # img2dataset's layout: key.{jpg,png,webp} + key.txt + key.json, keys = row numbers
    assert members[:3] == ["000000000.png", "000000000.txt", "000000000.json"]
    assert "000000001.jpg" in members and "000000002.jpg" in members  # the bmp was re-encoded as jpg
    with tarfile.open(shards[0]) as tar:
        meta = json.loads(tar.extractfile("000000001.json").read())
    assert meta == {"key": "000000001", "caption": "picture number 1", "image": names[1], "width": 41,
                    "height": 30, "license": "cc-by"}
    samples, skipped = read_back(make_shards.shard_pattern(shards))
    assert skipped == {}
    assert sorted(samples) == [f"{i:09d}" for i in range(len(names))]
    for i in range(len(names)):
        text, pixels = samples[f"{i:09d}"]
        assert text == f"picture number {i}"
        np.testing.assert_allclose(pixels, np.broadcast_to(clip(colour(i)), pixels.shape), atol=0.08)


def test_caption_shards_from_csv_round_trip(picture_dir, capsys):
    root, names = picture_dir
    table = write_caption_csv(root / "captions.csv", names, "c001.jpg\n")  # a short row: no caption at all
    rc = make_shards.main(["captions", "--images", str(root / "img"), "--captions", str(table), "--out",
                           str(root / "out"), "--samples-per-shard", "4", "--quiet", "--max-skip-fraction", "0.5"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "wrote 6 samples and 6 images in 2 shard(s)" in printed and "skipped 5 of 11 rows" in printed
    assert f"{root / 'out'}/{{00000..00001}}.tar" in printed
    stats = json.loads((root / "out" / "captions_stats.json").read_text())
    assert stats["skipped"] == {**EXPECTED_SKIPS, "missing_caption": 1} and stats["samples"] == 6
    check_captions(root / "out", names)


def test_caption_shards_from_jsonl_with_workers_and_bad_lines(picture_dir):
    root, names = picture_dir
    lines = [json.dumps({"image": r["file_name"], "text": r["caption"], "license": r["license"]})
             for r in caption_rows(names)]
    lines += ["{not json", json.dumps(["a", "list"]), json.dumps({"image": names[2]})]
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    report = make_shards.make_caption_shards(str(root / "captions.jsonl"), str(root / "img"), str(root / "out"),
                                             samples_per_shard=4, workers=2)
    assert report.samples == 6 and report.considered == 13
    assert dict(report.skipped) == {**EXPECTED_SKIPS, "malformed_row": 2, "missing_caption": 1}
    assert report.examples["missing_image"] == [f"row 6: {root / 'img' / 'nope.jpg'}"]
    check_captions(root / "out", names)


def test_caption_shards_from_parquet(picture_dir):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    root, names = picture_dir
    rows = caption_rows(names)
    rows[3]["caption"] = None  # a null caption
    pq.write_table(pa.Table.from_pylist(rows), root / "captions.parquet")
    report = make_shards.make_caption_shards(str(root / "captions.parquet"), str(root / "img"), str(root / "out"),
                                             samples_per_shard=4)
    assert report.samples == 5 and dict(report.skipped) == {**EXPECTED_SKIPS, "missing_caption": 1}


def test_unknown_column_and_skip_limit_are_errors(picture_dir, capsys):
    root, names = picture_dir
    table = write_caption_csv(root / "captions.csv", names)
    args = ["captions", "--images", str(root / "img"), "--captions", str(table), "--out", str(root / "out"),
            "--quiet"]
    assert make_shards.main([*args, "--caption-column", "alt_text"]) == 1
    err = capsys.readouterr().err
    assert "unknown caption column 'alt_text'" in err and "['file_name', 'caption', 'license']" in err
    assert make_shards.main(args) == 1  # 4 of 10 rows are bad: above the default limit (0.1)
    captured = capsys.readouterr()
    assert "4 of 10 rows were unusable" in captured.err and "--max-skip-fraction=0.1" in captured.err
    assert "missing_image" in captured.out and "corrupt_image" in captured.out  # counts by reason printed
    stats = json.loads((root / "out" / "captions_stats.json").read_text())
    assert stats["skipped"] == EXPECTED_SKIPS
    assert make_shards.main([*args, "--max-skip-fraction", "0.2", "--force"]) == 1
    assert make_shards.main([*args, "--max-skip-fraction", "0.5", "--force"]) == 0


def llava(images, question="What colour is this?", answer="It is a colour."):
    return {"image": images[0] if len(images) == 1 else list(images),
            "conversations": [{"from": "human", "value": "<image>\n" * len(images) + question},
                              {"from": "gpt", "value": answer}]}


def test_instruction_shards_round_trip(tmp_path, capsys):
    names = write_images(tmp_path / "img", 5, fmts=("png", "jpg"))
    (tmp_path / "img" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    records = [llava([names[0]], answer="first"), llava([names[1], names[2]], answer="second"),
               llava([names[0]], answer="third"),  # the same picture again: stored once
               llava(["gone.jpg"]), llava([names[3], "corrupt.png"]),
               {"conversations": [{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
               llava([names[4]], answer="fifth")]
    (tmp_path / "llava.json").write_text(json.dumps(records))
    out = tmp_path / "out"
    rc = make_shards.main(["instructions", "--data", str(tmp_path / "llava.json"), "--format", "llava",
                           "--image-root", str(tmp_path / "img"), "--out", str(out), "--images-per-shard", "2",
                           "--quiet", "--max-skip-fraction", "0.5"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "wrote 4 records and 5 images in 3 shard(s)" in printed and "skipped 3 of 7 records" in printed
    stats = json.loads((out / "instructions_stats.json").read_text())
    assert stats["skipped"] == {"missing_image": 1, "corrupt_image": 1, "unknown_speaker": 1}
    written = [json.loads(line) for line in (out / "llava.jsonl").read_text().splitlines()]
    assert [r["conversations"][1]["value"] for r in written] == ["first", "second", "third", "fifth"]
    assert written[0]["image"] == written[2]["image"] == "images-00000.tar/000000000.png"
    assert written[1]["image"] == ["images-00000.tar/000000001.jpg", "images-00001.tar/000000002.png"]
    # the pipeline reads the images out of the shards, in record order
    p = InstructionPipeline([InstructionSource("vis", str(out / "llava.jsonl"), "llava", image_root=str(out))],
                            tokenizer=TOK, seq_len=128, rows=4, image_budget=5, image_size=SIZE,
                            tokens_per_image=TPI, train=False, epochs=1)
    batch = next(p)
    assert p.state()["skipped"] == {}
    by_record = {info.record: info for info in p.last_batch}
    assert sorted(by_record) == [0, 1, 2, 3]
    pictures = {0: [0], 1: [1, 2], 2: [0], 3: [4]}  # record -> picture numbers
    expected = [colour(k) for info in sorted(p.last_batch, key=lambda s: s.row) for k in pictures[info.record]]
    for slot, rgb in enumerate(expected):
        np.testing.assert_allclose(batch["pixel_values"][slot].mean(axis=(0, 1)), clip(rgb), atol=0.08)


def test_instruction_shards_official_format(tmp_path):
    names = write_images(tmp_path / "img", 2, fmts=("png",))
    text = "The system.\nHuman: <image>\nHuman: <image>\nHuman: Same?\nAI: No."
    lines = [json.dumps({"image": names, "text": text, "task_type": "llava_sft"}), "{broken"]
    (tmp_path / "owl.jsonl").write_text("\n".join(lines) + "\n")
    report = make_shards.make_instruction_shards(str(tmp_path / "owl.jsonl"), "official", str(tmp_path / "out"),
                                                 image_root=str(tmp_path / "img"))
    assert report.samples == 1 and dict(report.skipped) == {"malformed_json": 1}
    record = json.loads((tmp_path / "out" / "owl.jsonl").read_text())
    assert record == {"image": ["images-00000.tar/000000000.png", "images-00000.tar/000000001.png"],
                      "text": text, "task_type": "llava_sft"}
    with tarfile.open(tmp_path / "out" / "images-00000.tar") as tar:
        data = tar.extractfile("000000001.png").read()
    assert data == (tmp_path / "img" / names[1]).read_bytes()  # PNG bytes kept as they were
    assert Image.open(io.BytesIO(data)).getpixel((0, 0)) == colour(1)


# ----------------------------------------------------------------------------------------------------
# inspect
# ----------------------------------------------------------------------------------------------------

@pytest.fixture()
def instruction_file(tmp_path):
    names = write_images(tmp_path / "img", 2, fmts=("png",))
    records = [llava([names[0]], question="What colour is the box?", answer="Bright red."),
               {"image": [names[0], names[1]], "conversations": [
                   {"from": "human", "value": "<image>\n<image>\nSame colour?"},
                   {"from": "gpt", "value": "No, they differ."},
                   {"from": "human", "value": "Which is brighter?"},
                   {"from": "gpt", "value": "The second."}]}]
    (tmp_path / "llava.json").write_text(json.dumps(records))
    return tmp_path


def run_inspect(*args):
    out = io.StringIO()
    assert inspect_tool.main([*args, "--color", "never"], out=out) == 0
    return out.getvalue()


def spans(text):
    """(mark, body) of every span line of the printed runs."""
    return [tuple(part.strip() for part in line.split("|", 1)) for line in text.splitlines() if "|" in line]


DIRECT = ["--tokenizer", "toy:512", "--seq-len", "128", "--image-size", str(SIZE), "--tokens-per-image", str(TPI)]


def test_inspect_marks_answers_trained_prompts_masked_and_image_slots(instruction_file):
    text = run_inspect("--instructions", str(instruction_file / "llava.json"), "--format", "llava", "--image-root",
                       str(instruction_file / "img"), "-n", "2", *DIRECT)
    marked = spans(text)
    assert ("TRAIN", "Bright red .</s>") in marked
    assert ("TRAIN", "No , they differ .</s>") in marked and ("TRAIN", "The second .</s>") in marked
    assert ("mask", "\\n Human : What colour is the box ? \\n AI :") in marked
    assert ("mask", "\\n Human : Which is brighter ? \\n AI :") in marked
    assert not any(mark == "TRAIN" and ("Human" in body or "colour" in body) for mark, body in marked)
    assert marked[0][0] == "mask" and marked[0][1].startswith("<s>The following is a conversation")
    images = [body for mark, body in marked if mark == "IMAGE"]
    assert len(images) == 3 and all(f"· {TPI} slots" in body for body in images)
    # the two-image record shows both pictures, by pixel_values row and colour
    assert {b.split(" ·")[0] for b in images} == {"image 0", "image 1", "image 2"}
    assert sum(f"mean RGB {colour(1)}" in b for b in images) == 1
    assert "  ! " not in text  # no layout warnings
    assert "(2 sample(s); skipped so far: none)" in text


def test_inspect_packed_rows_show_segments_and_restarting_positions(instruction_file):
    text = run_inspect("--instructions", str(instruction_file / "llava.json"), "--format", "llava", "--image-root",
                       str(instruction_file / "img"), "-n", "2", "--packing", "--seq-len", "256",
                       *DIRECT[:2], *DIRECT[4:], "--tokens")
    heads = [line for line in text.splitlines() if line.startswith("===")]
    assert "row 0 segment 1 · row positions 0.." in heads[0] and "model positions 0.." in heads[0]
    assert "row 0 segment 2" in heads[1] and "model positions 0.." in heads[1]
    start = int(heads[1].split("row positions ")[1].split("..")[0])
    assert start > 0
    rows = [line.split() for line in text.splitlines() if line.startswith("  ") and line.split()[0].isdigit()]
    assert {int(r[1]) for r in rows} == {1, 2}  # the segment id column
    image_slots = [r for r in rows if r[4] == "IMAGE"]
    assert len(image_slots) == 3 * TPI and image_slots[0][5:] == ["<image", "0", "slot", "0>"]
    assert image_slots[-1][5:] == ["<image", "2", "slot", f"{TPI - 1}>"]
    trained = "".join(line[line.index("'") + 1:line.rindex("'")] for line in text.splitlines()
                      if line.startswith("  ") and " TRAIN " in line)
    assert sorted(trained.split("</s>")) == ["", "Bright red .", "No , they differ .", "The second ."]


def test_inspect_warns_about_broken_layouts():
    tokens = np.array([[1, 5, -1, -1, 6, 7, 2, 0]], np.int32)
    batch = {"tokens": tokens, "targets": np.array([[5, 0, 0, 6, 9, 2, 0, 0]], np.int32),
             "loss_mask": np.array([[False, True, False, True, True, True, True, False]]),
             "positions": np.arange(8, dtype=np.int32)[None], "segment_ids": np.array([[1] * 7 + [0]], np.int32),
             "image_index": np.array([[-1, -1, 0, 1, -1, -1, -1, -1]], np.int32)}
    (sample,) = inspect_tool.batch_samples(batch, 0, tokens_per_image=2)
    assert [(s.mark, s.start, s.stop) for s in sample.spans] == [("mask", 0, 2), ("IMAGE", 2, 4), ("TRAIN", 4, 7)]
    assert any("loss on image slots (positions [2])" in w for w in sample.warnings)
    assert any("predicts a token outside the sample" in w for w in sample.warnings)  # position 6 -> padding
    assert any("targets differ from the next token at positions [4]" in w for w in sample.warnings)  # 9 is not the next token (7)


def test_inspect_from_config(instruction_file, tmp_path):
    from pathlib import Path
    base = Path(__file__).resolve().parent.parent / "configs" / "tiny_test.yaml"
    source = {"name": "vis", "path": str(instruction_file / "llava.json"), "format": "llava",
              "image_root": str(instruction_file / "img")}
    (tmp_path / "cfg.yaml").write_text(json.dumps({
        "base": str(base), "data": {"kind": "instructions", "tokenizer": "toy:512", "seq_len": 128,
                                    "sources": [source]}}))
    text = run_inspect("--config", str(tmp_path / "cfg.yaml"), "data.packing=true", "-n", "1")
    assert "=== batch 0 row 0 segment 1" in text and "· vis[" in text
    assert any(mark == "TRAIN" for mark, _ in spans(text)) and f"· {TPI} slots" in text


# ----------------------------------------------------------------------------------------------------
# make_shards: the output folder, the skip limit, max pixels
# ----------------------------------------------------------------------------------------------------

def good_table(root, names):
    table = root / "good.csv"
    with open(table, "w", newline="") as f:
        w = csv.DictWriter(f, ["file_name", "caption"])
        w.writeheader()
        w.writerows({"file_name": n, "caption": f"picture number {i}"} for i, n in enumerate(names))
    return table


def one_error_line(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert all(n in err for n in needles), err
    return err


def test_a_non_empty_out_is_refused_and_force_replaces_only_its_set(picture_dir, capsys):
    root, names = picture_dir
    out = root / "out"
    args = ["captions", "--images", str(root / "img"), "--captions", str(good_table(root, names)), "--out", str(out),
            "--samples-per-shard", "2", "--quiet"]
    assert make_shards.main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == ["00000.tar", "00001.tar", "00002.tar", "captions_stats.json"]
    (out / "00007.tar").write_bytes(b"an old, longer set")  # a brace pattern {00000..00007} would reach it
    (out / "notes.txt").write_text("mine")
    (out / "other-00000.tar").write_bytes(b"another set (another prefix)")
    capsys.readouterr()
    assert make_shards.main([*args, "--samples-per-shard", "3"]) == 2
    one_error_line(capsys, "is not empty", "--force")
    assert (out / "00002.tar").exists() and (out / "00007.tar").exists()  # nothing touched
    assert make_shards.main([*args, "--samples-per-shard", "3", "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["00000.tar", "00001.tar", "captions_stats.json", "notes.txt",
                                                     "other-00000.tar"]
    samples, skipped = read_back(str(out / "0000{0,1}.tar"))
    assert len(samples) == 6 and skipped == {}


def test_output_path_mistakes_are_one_line_before_any_work(picture_dir, capsys, monkeypatch):
    root, names = picture_dir
    table = good_table(root, names)

    def no_work(job):
        raise AssertionError("an image was read before the output folder was checked")
    monkeypatch.setattr(make_shards, "load_image", no_work)
    (root / "a_file").write_text("x")
    base = ["captions", "--images", str(root / "img"), "--captions", str(table), "--quiet", "--out"]
    assert make_shards.main([*base, str(root / "a_file" / "shards")]) == 2
    one_error_line(capsys, "a_file is a file, not a directory")
    assert make_shards.main([*base, str(root / "a_file")]) == 2
    one_error_line(capsys, "is a file, not a directory")

    def read_only(*a, **k):
        raise PermissionError(13, "Permission denied")
    with monkeypatch.context() as m:  # as root a chmod does not stop writes: the probe is what decides
        m.setattr("owl_jax.paths.tempfile.mkstemp", read_only)
        assert make_shards.main([*base, str(root / "ro")]) == 2
    one_error_line(capsys, "cannot be written", "permission denied")
    records = root / "llava.json"
    records.write_text(json.dumps([llava([names[0]])]))
    assert make_shards.main(["instructions", "--data", str(records), "--format", "llava", "--out",
                             str(root / "a_file" / "x")]) == 2
    one_error_line(capsys, "is a file, not a directory")


def test_the_default_skip_limit_fails_a_mostly_broken_table(picture_dir, capsys):
    """6 of 12 rows bad used to exit 0; the default limit is 0.1, counts by reason are printed."""
    root, names = picture_dir
    rows = [{"file_name": n, "caption": f"picture {i}"} for i, n in enumerate(names)]
    rows += [{"file_name": f"missing{i}.jpg", "caption": "x"} for i in range(6)]
    table = root / "half.csv"
    with open(table, "w", newline="") as f:
        w = csv.DictWriter(f, ["file_name", "caption"])
        w.writeheader()
        w.writerows(rows)
    args = ["captions", "--images", str(root / "img"), "--captions", str(table), "--out", str(root / "out"), "--quiet"]
    assert make_shards.main(args) == 1
    captured = capsys.readouterr()
    assert "6 of 12 rows were unusable" in captured.err and "--max-skip-fraction=0.1" in captured.err
    assert "missing_image" in captured.out and "skipped 6 of 12 rows" in captured.out
    assert make_shards.main([*args, "--force", "--max-skip-fraction", "0.5"]) == 0


def test_max_pixels_option(picture_dir, monkeypatch):
    """The pictures are 40..45 x 30 pixels; PIL's own limit is lowered to 500 pixels (it used to refuse
    any image above it whatever --max-pixels said)."""
    root, names = picture_dir
    table = good_table(root, names)
    report = make_shards.make_caption_shards(str(table), str(root / "img"), str(root / "a"), max_pixels=1300)
    assert report.samples == 4 and dict(report.skipped) == {"decompression_bomb": 2}  # 44x30 and 45x30
    assert "more than max_pixels=1300" in report.examples["decompression_bomb"][0]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)
    assert make_shards.main(["captions", "--images", str(root / "img"), "--captions", str(table), "--out",
                             str(root / "b"), "--max-pixels", "2000", "--quiet"]) == 0
    samples, skipped = read_back(str(root / "b" / "00000.tar"))  # the pipeline's limit decides too
    assert len(samples) == 6 and skipped == {}
    p = CaptionPipeline(str(root / "b" / "00000.tar"), tokenizer=TOK, seq_len=24, rows=1, image_budget=1,
                        image_size=SIZE, tokens_per_image=TPI, shuffle=False, train=False, epochs=1,
                        max_pixels=1300, max_skip_fraction=1.0)
    assert len(list(p)) == 4 and p.skip_counts() == {"decompression_bomb": 2}


def test_data_max_pixels_reaches_the_pipelines(instruction_file, tmp_path, capsys):
    from pathlib import Path
    base = Path(__file__).resolve().parent.parent / "configs" / "tiny_test.yaml"
    source = {"name": "vis", "path": str(instruction_file / "llava.json"), "format": "llava",
              "image_root": str(instruction_file / "img")}
    (tmp_path / "cfg.yaml").write_text(json.dumps({
        "base": str(base), "data": {"kind": "instructions", "tokenizer": "toy:512", "seq_len": 128,
                                    "sources": [source]}}))
    out = io.StringIO()
    assert inspect_tool.main(["--config", str(tmp_path / "cfg.yaml"), "data.max_pixels=100", "-n", "1"], out=out) == 1
    assert "decompression_bomb" in capsys.readouterr().err  # the 40x30 pictures are over 100 pixels


def test_inspect_shows_n_samples_with_a_partial_last_batch(tmp_path):
    from data_pipelines.writer import write_caption_shards
    pictures = ((f"{i:03d}", Image.new("RGB", (20, 20), colour(i)), f"picture {i}") for i in range(6))
    write_caption_shards(pictures, str(tmp_path / "s-%d.tar"), 10)
    args = ["--shards", str(tmp_path / "s-0.tar"), "--rows", "4", *DIRECT]
    text = run_inspect(*args, "-n", "6")
    assert text.count("=== batch") == 6 and "=== batch 1 row 1 segment 1" in text
    assert "(6 sample(s); skipped so far: none)" in text
    text = run_inspect(*args, "-n", "9")
    assert text.count("=== batch") == 6 and "(6 sample(s); the data has only 6;" in text
