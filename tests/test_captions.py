"""Stage-1 caption pipeline: exact resume, worker determinism, process split and re-split, CLIP
preprocessing against the official processor, and a corpus of bad data that is skipped and counted."""

import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from data_pipelines import images as image_ops
from data_pipelines.captions import CaptionPipeline, DataError
from data_pipelines.tokenizers import ToyWordTokenizer
from data_pipelines.writer import ShardWriter, encode_image, write_caption_shards

TOK = ToyWordTokenizer(512)


def noise_image(rng, w=80, h=64):
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def clean_shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("clean")
    rng = np.random.default_rng(0)
    samples = ((f"{i:05d}", noise_image(rng), f"caption number {i}") for i in range(60))
    write_caption_shards(samples, str(d / "c-%03d.tar"), 10)
    return str(d / "c-{000..005}.tar")


def pipeline(sources, **kw):
    args = dict(tokenizer=TOK, seq_len=24, rows=4, image_budget=4, image_size=56, tokens_per_image=9,
                shuffle_shards=2)
    args.update(kw)
    return CaptionPipeline(sources, **args)


def sample_keys(p, n):
    """Keys of the next n samples (the pipeline's own sample-level API)."""
    return [p.next_sample()[0] for _ in range(n)]


def test_resume_replays_exactly_the_same_batches(clean_shards):
    p = pipeline(clean_shards)
    for _ in range(3):
        next(p)
    state = p.state()
    expected = [next(p) for _ in range(5)]  # crosses windows and the epoch boundary (60 samples)
    resumed = pipeline(clean_shards, state=state)
    for a, b in zip(expected, (next(resumed) for _ in range(5))):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert resumed.state() == p.state()


def test_workers_give_the_same_batches_as_inline_decoding(clean_shards):
    inline = [next(pipeline(clean_shards)) for _ in range(1)]
    p = pipeline(clean_shards, num_workers=2)
    try:
        pooled = [next(p)]
        state = p.state()
    finally:
        p.close()
    for k in inline[0]:
        np.testing.assert_array_equal(inline[0][k], pooled[0][k])
    assert state["seen"] == 4  # prefetched samples are not counted as consumed


def test_batch_layout(clean_shards):
    batch = next(pipeline(clean_shards, seq_len=24))
    assert batch["tokens"].shape == (4, 24) and batch["pixel_values"].shape == (4, 56, 56, 3)
    row = batch["tokens"][0]
    assert row[0] == TOK.bos_id and (row[1:10] == -1).all()  # <image> right after BOS (default template)
    np.testing.assert_array_equal(batch["image_index"][0, 1:10], np.arange(9))
    eos = int(np.flatnonzero(row == TOK.eos_id)[0])
    mask = batch["loss_mask"][0]
    assert not mask[:9].any() and mask[9:eos].all() and not mask[eos:].any()  # caption + EOS only
    np.testing.assert_array_equal(batch["targets"][0, :eos], np.maximum(row[1:eos + 1], 0))
    assert (batch["segment_ids"][0, :eos + 1] == 1).all() and (batch["segment_ids"][0, eos + 1:] == 0).all()


def test_template_text_is_not_trained(clean_shards):
    batch = next(pipeline(clean_shards, template="Picture: <image> Caption: {caption}"))
    row, mask = batch["tokens"][0], batch["loss_mask"][0]
    first_slot = int(np.flatnonzero(row == -1)[0])
    caption_start = first_slot + 9 + len(TOK.encode(" Caption: "))
    assert not mask[:caption_start - 1].any() and mask[caption_start - 1]


def test_processes_split_an_epoch_and_resplit_without_loss_or_repeats(clean_shards):
    two = [pipeline(clean_shards, process_index=i, num_processes=2, rows=2, image_budget=2) for i in range(2)]
    seen = []
    for p in two:
        seen += sample_keys(p, 10)
    assert len(set(seen)) == 20  # disjoint
    states = [p.state() for p in two]
    one = pipeline(clean_shards, rows=2, image_budget=2)
    one = pipeline(clean_shards, rows=2, image_budget=2, state=one.remap_states(states)[0])
    seen += sample_keys(one, 40)
    assert len(seen) == 60 and len(set(seen)) == 60  # the whole epoch, each sample once

    # 1 -> 3 processes mid-window, with uneven progress recorded as exclusions
    single = pipeline(clean_shards, rows=2, image_budget=2)
    first = sample_keys(single, 7)
    three = [pipeline(clean_shards, process_index=i, num_processes=3, rows=2, image_budget=2, epochs=1,
                      state=single.remap_states([single.state()], 3)[i]) for i in range(3)]
    rest = [k for p in three for k in drain(p)]
    assert len(first + rest) == 60 and len(set(first + rest)) == 60


def drain(p):
    keys = []
    while True:
        try:
            keys.append(p.next_sample()[0])
        except StopIteration:
            return keys


def test_eval_preprocessing_matches_the_official_processor(golden_dir):
    inputs, outputs = np.load(golden_dir / "inputs.npz"), np.load(golden_dir / "outputs.npz")
    image = Image.fromarray(inputs["proc_image_uint8_hwc"])
    ours = image_ops.preprocess(image, 56, train=False)
    np.testing.assert_allclose(ours, outputs["proc_pixel_values"][0].transpose(1, 2, 0), atol=1e-5)


def test_train_augmentation_is_deterministic_per_sample():
    image = noise_image(np.random.default_rng(1), 120, 90)
    a = image_ops.preprocess(image, 56, train=True, rng=np.random.default_rng([3, 0, 0, 5]))
    b = image_ops.preprocess(image, 56, train=True, rng=np.random.default_rng([3, 0, 0, 5]))
    c = image_ops.preprocess(image, 56, train=True, rng=np.random.default_rng([3, 0, 0, 6]))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    box = image_ops.random_resized_crop_box(120, 90, np.random.default_rng(0))
    area = (box[2] - box[0]) * (box[3] - box[1]) / (120 * 90)
    assert 0.45 < area <= 1.0


# --------------------------------------------------------------------------------------------
# Bad data
# --------------------------------------------------------------------------------------------


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def bad_corpus(tmp_path_factory):
    """Shards mixing good samples with every kind of bad one; returns (pattern, expected counts, good)."""
    d = tmp_path_factory.mktemp("bad")
    rng = np.random.default_rng(2)
    good_jpg = encode_image(noise_image(rng))
    w = ShardWriter(str(d / "b-%03d.tar"), samples_per_shard=12)
    good = 0

    def ok(key, files):
        nonlocal good
        w.write(key, files)
        good += 1

    cmyk = io.BytesIO()
    noise_image(rng).convert("CMYK").save(cmyk, "JPEG")
    gray16 = Image.fromarray((rng.integers(0, 65535, (40, 50))).astype(np.uint16))
    # shard 0: valid but unusual images (converted, not skipped) and good ones
    ok("cmyk", {"jpg": cmyk.getvalue(), "txt": b"cmyk picture"})
    ok("gray", {"png": _png(noise_image(rng).convert("L")), "txt": b"gray picture"})
    ok("rgba", {"png": _png(noise_image(rng).convert("RGBA")), "txt": b"rgba picture"})
    ok("la", {"png": _png(noise_image(rng).convert("LA")), "txt": b"la picture"})
    ok("gray16", {"png": _png(gray16), "txt": b"sixteen bit picture"})
    ok("palette", {"png": _png(noise_image(rng).convert("P")), "txt": b"palette picture"})
    for i in range(6):
        ok(f"good0-{i}", {"jpg": good_jpg, "txt": f"good {i}".encode()})
    # shard 1: bad samples
    bad = {
        "corrupt_image": [("corrupt", {"jpg": b"\xff\xd8\xff\xe0 definitely not a jpeg", "txt": b"x"}),
                          ("truncated-jpg", {"jpg": good_jpg[: len(good_jpg) // 3], "txt": b"x"})],
        "decompression_bomb": [("bomb", {"png": _png(Image.new("RGB", (1200, 1000))), "txt": b"x"})],
        "empty_caption": [("empty", {"jpg": good_jpg, "txt": b"   \n"})],
        "missing_caption": [("nocap", {"jpg": good_jpg, "json": b"{}"})],
        "non_utf8_caption": [("latin1", {"jpg": good_jpg, "txt": "caf\xe9 cr\xe8me".encode("latin-1")})],
        "missing_image": [("noimg", {"txt": b"caption without a picture"})],
        "empty_image": [("zero", {"jpg": b"", "txt": b"x"})],
    }
    for samples in bad.values():
        for key, files in samples:
            w.write(key, files)
    for i in range(12 - sum(len(v) for v in bad.values())):
        ok(f"good1-{i}", {"jpg": good_jpg, "txt": f"more {i}".encode()})
    # shard 2: all bad (must not hang); shard 3: good, to be truncated
    for i in range(12):
        w.write(f"allbad-{i}", {"jpg": b"garbage", "txt": b"x"})
    for i in range(12):
        ok(f"good3-{i}", {"jpg": good_jpg, "txt": f"last {i}".encode()})
    w.close()
    # truncate shard 3 in the block padding after the 6-byte caption of its 7th sample: that sample is
    # complete and kept (it used to be dropped), the 5 after it are lost
    path = d / "b-003.tar"
    with tarfile.open(path) as tar:
        members = [m for m in tar.getmembers()]
    assert members[13].size == 6
    cut = members[13].offset_data + 10
    with open(path, "r+b") as f:
        f.truncate(cut)
    good -= 5
    # shard 4: not a tar at all; shard 5: listed but missing
    (d / "b-004.tar").write_bytes(b"this is not a tar archive" * 50)
    counts = {k: len(v) for k, v in bad.items()}
    counts["corrupt_image"] += 12
    counts.update(truncated_shard=1, unreadable_shard=2)
    return str(d / "b-{000..005}.tar"), counts, good


def test_bad_data_is_skipped_and_counted(bad_corpus, caplog):
    pattern, expected, good = bad_corpus
    p = pipeline(pattern, rows=1, image_budget=1, max_skip_fraction=1.0, epochs=1, image_size=56,
                 max_pixels=1_000_000)
    with caplog.at_level("WARNING"):
        batches = list(p)
    assert len(batches) == good
    state = p.state()
    assert state["skipped"] == expected and state["seen"] == good
    assert "bomb" in caplog.text and "latin1" in caplog.text  # the sample key is in the warning
    assert all(np.isfinite(b["pixel_values"]).all() for b in batches)


def test_too_many_bad_samples_stop_the_run(bad_corpus):
    pattern, _, _ = bad_corpus
    p = pipeline(pattern, rows=1, image_budget=1, max_skip_fraction=0.05, max_pixels=1_000_000)
    with pytest.raises(DataError, match="max_skip_fraction"):
        for _ in range(1000):
            next(p)


def test_nothing_readable_is_an_error_not_a_hang(tmp_path):
    (tmp_path / "x-0.tar").write_bytes(b"nope")
    with pytest.raises(DataError, match="no samples"):
        next(pipeline(str(tmp_path / "x-{0..1}.tar")))
    bad_only = ShardWriter(str(tmp_path / "y-%d.tar"), 5)
    for i in range(5):
        bad_only.write(f"k{i}", {"jpg": b"bad", "txt": b"x"})
    bad_only.close()
    with pytest.raises(DataError):
        next(pipeline(str(tmp_path / "y-0.tar"), max_skip_fraction=1.0))


def test_pipe_sources(tmp_path, clean_shards):
    first = clean_shards.replace("{000..005}", "000")
    p = pipeline(f"pipe:cat {first}", shuffle=False, cache_dir=str(tmp_path), epochs=1)
    batches = list(p)
    # 10 samples in rows of 4: the last batch keeps its 2 samples, its other rows are padding
    assert len(batches) == 3
    last = batches[-1]
    assert (last["segment_ids"][2:] == 0).all() and not last["loss_mask"][2:].any()
    assert (last["segment_ids"][:2, 0] == 1).all() and (last["image_index"][:2] >= 0).any(axis=1).all()
    assert (last["image_index"][2:] < 0).all() and not last["pixel_values"][2:].any()


# ---------------------------------------------------------------- packing (several captions per row)

def packed_epoch(sources, **kw):
    """All batches of one epoch with packing, and the (key, row, segment) placements of each."""
    p = pipeline(sources, packing=True, epochs=1, **kw)
    out = []
    while True:
        try:
            batch = next(p)
        except StopIteration:
            return out
        out.append((batch, list(p.last_batch)))


def test_packed_batches_hold_every_sample_once_with_its_own_image(clean_shards):
    alone = pipeline(clean_shards, rows=1, image_budget=1, train=False, epochs=1)
    reference = {}
    while True:
        try:
            batch = next(alone)
        except StopIteration:
            break
        reference[alone.last_batch[0][0]] = batch
    batches = packed_epoch(clean_shards, seq_len=64, rows=2, image_budget=8, micro_batches=2, train=False)
    keys = [key for _, placed in batches for key, _, _ in placed]
    assert sorted(keys) == sorted(reference) and len(keys) == 60  # the epoch, each sample once, same order
    assert keys == [k for k in reference]
    assert max(len(placed) for _, placed in batches) > 2  # several captions per row
    for batch, placed in batches:
        for key, row, seg in placed:
            ref = reference[key]
            n = int((ref["segment_ids"][0] == 1).sum())
            span = batch["segment_ids"][row] == seg
            assert span.sum() == n
            for name in ("tokens", "targets", "loss_mask"):
                np.testing.assert_array_equal(batch[name][row][span], ref[name][0, :n], err_msg=name)
            np.testing.assert_array_equal(batch["positions"][row][span], np.arange(n))
            # the segment's visual tokens come from its own image, within the row's micro-batch budget
            slots = batch["image_index"][row][span]
            image = np.unique(slots[slots >= 0] // 9)
            assert len(image) == 1
            micro, k = row % 2, 2
            np.testing.assert_array_equal(batch["pixel_values"][image[0] * k + micro], ref["pixel_values"][0])
        per_micro = [(batch["image_index"][m::2] >= 0).sum() // 9 for m in range(2)]
        assert max(per_micro) <= 4  # image_budget 8 over 2 micro-batches


def test_packed_resume_replays_exactly_the_same_batches(clean_shards):
    p = pipeline(clean_shards, packing=True, seq_len=64, rows=2, image_budget=8)
    returned = 0
    for _ in range(2):
        next(p)
        returned += len(p.last_batch)
    state = p.state()
    assert state["seen"] == returned  # the sample held over for the next batch is not in the state yet
    expected = [next(p) for _ in range(6)]  # crosses windows and the epoch boundary
    resumed = pipeline(clean_shards, packing=True, seq_len=64, rows=2, image_budget=8, state=state)
    for a, b in zip(expected, (next(resumed) for _ in range(6))):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert resumed.state() == p.state()


def test_packed_processes_resplit_without_loss_or_repeats(clean_shards):
    two = [pipeline(clean_shards, packing=True, seq_len=64, rows=2, image_budget=4, process_index=i, num_processes=2)
           for i in range(2)]
    seen = []
    for p in two:
        next(p)
        seen += [key for key, _, _ in p.last_batch]
    states = [p.state() for p in two]
    one = pipeline(clean_shards, packing=True, seq_len=64, rows=2, image_budget=4)
    one = pipeline(clean_shards, packing=True, seq_len=64, rows=2, image_budget=4, epochs=1,
                   state=one.remap_states(states)[0])
    while True:
        try:
            next(one)
        except StopIteration:
            break
        seen += [key for key, _, _ in one.last_batch]
    assert len(seen) == 60 and len(set(seen)) == 60


def test_model_gives_the_same_per_caption_loss_packed_and_unpacked(clean_shards):
    """Stage-1 packing trains the same function: each caption's per-token losses on a tiny f32 model are
    those of the caption alone (its image reaches only its own slots; no attention crosses segments)."""
    import jax
    from flax import nnx

    from owl_jax.config import load_config
    from owl_jax.loss import token_nll
    from owl_jax.models.owl import build_model

    cfg = load_config("configs/model/tiny.yaml", ["model.abstractor.attention_dropout=0.0", "model.vision.num_layers=1",
                                                  "model.abstractor.num_layers=1", "model.text.num_layers=1",
                                                  "model.text.vocab_size=512"]).model
    model = build_model(cfg)
    size, tpi = cfg.vision.image_size, cfg.tokens_per_image

    @nnx.jit
    def per_token_nll(m, batch):
        hidden = m(batch["tokens"], positions=batch["positions"], segment_ids=batch["segment_ids"],
                   pixel_values=batch["pixel_values"], image_index=batch["image_index"])
        return token_nll(hidden, m.language_model.output_kernel(), batch["targets"], chunk_size=m.loss_chunk_size)

    def losses(packing, rows, budget, batches):
        p = pipeline(clean_shards, packing=packing, seq_len=96, rows=rows, image_budget=budget, image_size=size,
                     tokens_per_image=tpi, train=False)
        out = {}
        for _ in range(batches):
            batch = next(p)
            nll = np.asarray(jax.device_get(per_token_nll(model, batch)))
            for key, row, seg in p.last_batch:
                span = batch["segment_ids"][row] == seg
                out[key] = nll[row][span][batch["loss_mask"][row][span]]
        return out

    packed, alone = losses(True, 2, 8, 2), losses(False, 4, 4, 3)
    common = sorted(set(packed) & set(alone))
    assert len(common) >= 8
    for key in common:
        assert len(packed[key]) == len(alone[key]) > 0
        np.testing.assert_allclose(packed[key], alone[key], atol=1e-5, rtol=0, err_msg=key)


# ---------------------------------------------------------------- each bad sample counted once over the run

@pytest.fixture(scope="module")
def few_bad(tmp_path_factory):
    """3 listed shards: 10 samples in two (one corrupt image, one without caption) and a missing one."""
    d = tmp_path_factory.mktemp("fewbad")
    rng = np.random.default_rng(5)
    with ShardWriter(str(d / "f-%d.tar"), 5) as w:
        for i in range(10):
            files = {"jpg": encode_image(noise_image(rng, 16, 16)), "txt": f"fine {i}".encode()}
            if i == 3:
                files["jpg"] = b"not a picture"
            if i == 7:
                del files["txt"]
            w.write(f"s{i}", files)
    return str(d / "f-{0..2}.tar")


DISTINCT = {"corrupt_image": 1, "missing_caption": 1, "unreadable_shard": 1}


def summed(counts):
    total = {}
    for c in counts:
        for k, v in c.items():
            total[k] = total.get(k, 0) + v
    return total


def test_a_bad_sample_is_counted_once_over_epochs_resume_and_resplit(few_bad):
    kw = dict(rows=2, image_budget=2, shuffle_shards=1, max_skip_fraction=0.5)
    whole = pipeline(few_bad, epochs=3, **kw)
    assert len([b for b in whole]) == 12 and whole.skip_counts() == DISTINCT  # 8 usable x 3 epochs
    assert whole.state()["considered"] == 10 and whole.state()["seen"] == 24
    # resume in epoch 1 (the shard windows are reopened: nothing is counted again)
    p = pipeline(few_bad, **kw)
    for _ in range(6):
        next(p)
    resumed = pipeline(few_bad, state=p.state(), **kw)
    for _ in range(8):  # into epoch 3
        next(resumed)
    assert resumed.skip_counts() == DISTINCT and resumed.state()["epoch"] >= 2
    old = {k: v for k, v in p.state().items() if k not in ("considered", "bad_shards")}  # saved by older code
    assert pipeline(few_bad, state=old, **kw).state()["considered"] == old["seen"] + 2  # its usable + bad
    # two processes, then re-split onto three: the counts sum to the distinct bad samples and shards
    two = [pipeline(few_bad, process_index=i, num_processes=2, **kw) for i in range(2)]
    for q in two:
        next(q)
        next(q)
    assert summed(q.skip_counts() for q in two) == DISTINCT
    states = two[0].remap_states([q.state() for q in two], 3)
    three = [pipeline(few_bad, process_index=i, num_processes=3, state=states[i], **kw) for i in range(3)]
    for q in three:
        for _ in range(4):
            next(q)
    assert summed(q.skip_counts() for q in three) == DISTINCT


def test_the_skip_limit_counts_the_first_pass_whatever_its_size(few_bad):
    p = pipeline(few_bad, rows=2, image_budget=2, shuffle_shards=1)  # default limit 0.1: 2 of 10 are bad
    with pytest.raises(DataError, match=r"2 of 10 samples were unusable .*corrupt_image: s3"):
        for _ in range(20):
            next(p)


def test_max_pixels_decides_not_pils_own_limit(monkeypatch):
    """A big photo is usable when max_pixels allows it (PIL's module limit used to refuse it first), at
    a tiny scale: PIL's limit lowered to 500 pixels."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)
    warn_zone, error_zone = _png(Image.new("RGB", (30, 30))), _png(Image.new("RGB", (40, 40)))  # 900, 1600 px
    for data in (warn_zone, error_zone):
        assert image_ops.decode_image(data, max_pixels=2000).size[0] in (30, 40)
    with pytest.raises(image_ops.BadSample, match="decompression_bomb: .*max_pixels=1000"):
        image_ops.decode_image(error_zone, max_pixels=1000)
    with pytest.raises(image_ops.BadSample, match="decompression_bomb"):
        image_ops.decode_image(warn_zone, max_pixels=800)
    assert Image.MAX_IMAGE_PIXELS == 500
