"""Static-shape batching: padding and first-fit packing with segment ids and restarting positions."""

import numpy as np
import pytest

from data_pipelines.conversation import AI, HUMAN, make_conversation
from data_pipelines.packing import KEYS, pack_batch, pad_batch
from data_pipelines.tokenize import TrainingSample, to_training_sample
from data_pipelines.tokenizers import ToyWordTokenizer

TPI = 9
TOK = ToyWordTokenizer(512)


def synthetic(n, start, images=(), loss_last=False):
    """A sample of length n with distinct ids start..start+n-1 (images as -1 runs after the first id)."""
    tokens = np.arange(start, start + n, dtype=np.int32)
    for k in range(len(images)):
        tokens[1 + k * (TPI + 1):1 + k * (TPI + 1) + TPI] = -1
    targets = np.append(np.where(tokens[1:] < 0, 0, tokens[1:]), 0).astype(np.int32)
    loss_mask = np.append(tokens[1:] >= 0, loss_last)
    return TrainingSample(tokens, targets, loss_mask, tuple(images))


def real_samples():
    convs = [make_conversation([(HUMAN, "<image>"), (HUMAN, "What is it?"), (AI, "A cat.")], images=["a.jpg"]),
             make_conversation([(HUMAN, "Hi"), (AI, "Hello there."), (HUMAN, "Bye"), (AI, "Bye!")]),
             make_conversation([(HUMAN, "<image>"), (HUMAN, "<image>"), (HUMAN, "Same?"), (AI, "No.")],
                               images=["b.jpg", "c.jpg"]),
             make_conversation([(HUMAN, "Name a colour."), (AI, "Red.")])]
    return [to_training_sample(c, TOK, 128, TPI) for c in convs]


def check_layout(batch, samples, seq_len):
    """Every segment holds its sample verbatim (last position masked), positions restart, padding is inert."""
    a = batch.arrays
    for key in KEYS:
        assert a[key].shape == (len(batch.num_images), seq_len)
    assert a["loss_mask"].dtype == bool and all(a[k].dtype == np.int32 for k in KEYS if k != "loss_mask")
    placed = [j for j in range(len(samples)) if j not in batch.leftover]
    assert len(placed) == len(batch.placement)
    for j, (row, start, seg) in zip(placed, batch.placement):
        s = samples[j]
        n = len(s.tokens)
        sl = slice(start, start + n)
        np.testing.assert_array_equal(a["tokens"][row, sl], s.tokens)
        np.testing.assert_array_equal(a["targets"][row, start:start + n - 1], s.targets[:-1])
        np.testing.assert_array_equal(a["loss_mask"][row, start:start + n - 1], s.loss_mask[:-1])
        assert not a["loss_mask"][row, start + n - 1] and a["targets"][row, start + n - 1] == 0
        np.testing.assert_array_equal(a["positions"][row, sl], np.arange(n))
        assert (a["segment_ids"][row, sl] == seg).all()
    pad = a["segment_ids"] == 0
    assert (a["tokens"][pad] == 0).all() and not a["loss_mask"][pad].any() and (a["positions"][pad] == 0).all()
    # no target crosses a segment boundary: wherever loss counts, the next position is the same segment
    seg = a["segment_ids"]
    nxt = np.concatenate([seg[:, 1:], np.zeros_like(seg[:, :1])], axis=1)
    assert (seg[a["loss_mask"]] == nxt[a["loss_mask"]]).all()
    tok_next = np.concatenate([a["tokens"][:, 1:], np.zeros_like(seg[:, :1])], axis=1)
    lm = a["loss_mask"]
    np.testing.assert_array_equal(a["targets"][lm], tok_next[lm])
    # segment ids are 1..n in order within each row, then padding
    for row in seg:
        used = row[row > 0]
        assert (np.diff(used) >= 0).all() and (np.unique(used) == np.arange(1, len(np.unique(used)) + 1)).all()
        assert not (row[:len(used)] == 0).any()


def test_pad_batch_shapes_and_rows():
    samples = real_samples()
    batch = pad_batch(samples, 80, rows=6)
    check_layout(batch, samples, 80)
    assert [p[0] for p in batch.placement] == [0, 1, 2, 3] and all(p[1:] == (0, 1) for p in batch.placement)
    np.testing.assert_array_equal(batch.num_images, [1, 0, 2, 0, 0, 0])
    assert batch.images == ["a.jpg", "b.jpg", "c.jpg"] and batch.leftover == []
    assert (batch.arrays["segment_ids"][4:] == 0).all()  # padding rows
    for r, s in enumerate(samples):
        assert (batch.arrays["segment_ids"][r] == 1).sum() == len(s)
    # the image slot runs of every row match its image count (what plan_image_slots checks)
    for r in range(6):
        row = batch.arrays["tokens"][r]
        runs = np.flatnonzero(np.diff(np.concatenate([[0], (row < 0).astype(int), [0]])) == 1)
        assert len(runs) == batch.num_images[r]
    with pytest.raises(ValueError, match="do not fit in 3 rows"):
        pad_batch(samples, 80, rows=3)


def test_pack_first_fit():
    lengths = [6, 5, 4, 3, 2]
    samples = [synthetic(n, 10 * (i + 1)) for i, n in enumerate(lengths)]
    batch = pack_batch(samples, 10, rows=2)
    # first fit: 6 -> row 0; 5 -> row 1; 4 -> row 0 (full); 3 -> row 1; 2 -> row 1 (full)
    assert batch.placement == [(0, 0, 1), (1, 0, 1), (0, 6, 2), (1, 5, 2), (1, 8, 3)]
    assert batch.leftover == [] and (batch.arrays["segment_ids"] > 0).all()  # rows filled exactly
    check_layout(batch, samples, 10)
    np.testing.assert_array_equal(batch.arrays["segment_ids"][1], [1] * 5 + [2] * 3 + [3] * 2)
    np.testing.assert_array_equal(batch.arrays["positions"][1], [0, 1, 2, 3, 4, 0, 1, 2, 0, 1])


def test_pack_later_small_sample_fills_an_earlier_row_and_leftovers():
    samples = [synthetic(7, 100), synthetic(7, 200), synthetic(7, 300), synthetic(3, 400), synthetic(2, 500)]
    batch = pack_batch(samples, 10, rows=2)
    assert batch.leftover == [2]  # no room for the third 7
    assert batch.placement == [(0, 0, 1), (1, 0, 1), (0, 7, 2), (1, 7, 2)]
    assert (batch.arrays["segment_ids"][0] > 0).all() and (batch.arrays["segment_ids"][1] == [1] * 7 + [2] * 2 + [0]).all()
    check_layout(batch, samples, 10)


def test_pack_preserves_order_and_images():
    samples = [synthetic(14, 10, images=["a"]), synthetic(5, 40), synthetic(25, 60, images=["b", "c"]),
               synthetic(8, 100, images=["d"]), synthetic(3, 200)]
    batch = pack_batch(samples, 32, rows=2)
    assert batch.leftover == []
    rows = [[i for i, p in enumerate(batch.placement) if p[0] == r] for r in range(2)]
    assert rows == [[0, 1, 3, 4], [2]]  # 14 + 5 + 8 + 3 = 30 <= 32; the 25 opens row 1
    for r, members in enumerate(rows):  # within a row: input order, segment ids 1..n, increasing starts
        assert [batch.placement[i][2] for i in members] == list(range(1, len(members) + 1))
        assert [batch.placement[i][1] for i in members] == sorted(batch.placement[i][1] for i in members)
    np.testing.assert_array_equal(batch.num_images, [2, 2])  # a, d | b, c
    assert batch.images == ["a", "d", "b", "c"]  # row-major, segment order: the order of plan_micro_batched_slots
    check_layout(batch, samples, 32)


def test_pack_real_samples_match_padded():
    samples = real_samples()
    seq_len = 128  # lengths 57, 52, 66, 44: first fit gives rows [57, 52], [66, 44]
    packed = pack_batch(samples, seq_len, rows=len(samples))
    padded = pad_batch(samples, seq_len)
    check_layout(packed, samples, seq_len)
    assert [p[0] for p in packed.placement] == [0, 0, 1, 1] and (packed.arrays["segment_ids"][2:] == 0).all()
    np.testing.assert_array_equal(packed.num_images, [1, 2, 0, 0])
    for (pr, ps, _), (qr, qs, _), s in zip(packed.placement, padded.placement, samples):
        n = len(s)
        for key in ("tokens", "targets", "loss_mask", "positions"):
            np.testing.assert_array_equal(packed.arrays[key][pr, ps:ps + n], padded.arrays[key][qr, qs:qs + n])
    assert packed.arrays["loss_mask"].sum() == padded.arrays["loss_mask"].sum() == sum(s.loss_mask.sum() for s in samples)


def test_last_position_of_each_segment_never_trains():
    """Even a sample that claims loss at its last position: its target would lie in the next segment."""
    samples = [synthetic(4, 10, loss_last=True), synthetic(4, 20, loss_last=True)]
    for batch in (pack_batch(samples, 8, rows=1), pad_batch(samples, 8)):
        check_layout(batch, samples, 8)
    packed = pack_batch(samples, 8, rows=1)
    assert not packed.arrays["loss_mask"][0, 3] and packed.arrays["targets"][0, 3] == 0


def test_too_long_is_an_error():
    samples = [synthetic(5, 10), synthetic(11, 20)]
    with pytest.raises(ValueError, match="sample 1 has 11 tokens.*truncate"):
        pack_batch(samples, 10, rows=4)
    with pytest.raises(ValueError, match="sample 1 has 11 tokens"):
        pad_batch(samples, 10)


def test_mapping_samples():
    s = synthetic(4, 10)
    as_dict = {"tokens": s.tokens, "targets": s.targets, "loss_mask": s.loss_mask, "num_images": 0}
    batch = pack_batch([as_dict, as_dict], 8, rows=1)
    np.testing.assert_array_equal(batch.arrays["segment_ids"][0], [1, 1, 1, 1, 2, 2, 2, 2])
    assert batch.images == [] and batch.num_images.tolist() == [0]


def test_model_gives_the_same_per_sample_loss_packed_and_unpacked(tmp_path):
    """Model level (DESIGN.md §4): the real InstructionPipeline with packing=True and packing=False feeds a
    tiny float32 mPLUG-Owl; every sample seen by both has the same loss tokens and the same per-token
    losses, text-only samples and samples with one or two images alike (each image must reach its own
    sample's slots, and no attention or loss may cross a segment boundary)."""
    import json

    import jax
    from flax import nnx
    from PIL import Image

    from data_pipelines.instructions import InstructionPipeline, InstructionSource
    from owl_jax.config import load_config
    from owl_jax.loss import token_nll
    from owl_jax.models.owl import build_model

    cfg = load_config("configs/model/tiny.yaml", ["model.abstractor.attention_dropout=0.0", "model.vision.num_layers=1",
                                                  "model.abstractor.num_layers=1", "model.text.num_layers=1"]).model
    tpi, size = cfg.tokens_per_image, cfg.vision.image_size
    (tmp_path / "img").mkdir()
    records = []
    for i, count in enumerate([1, 2, 1, 1, 2, 1]):
        names = []
        for k in range(count):
            name = f"p{i}_{k}.png"
            rgb = np.random.default_rng([i, k]).integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(rgb).save(tmp_path / "img" / name)
            names.append(name)
        records.append({"image": names, "conversations": [
            {"from": "human", "value": "<image>\n" * count + f"What is in picture {i}?"},
            {"from": "gpt", "value": f"Shapes number {i}, " + "and more " * i + "done."}]})
    (tmp_path / "vis.json").write_text(json.dumps(records))
    text = [{"instruction": f"Count to {i}", "input": "", "output": " ".join(map(str, range(i + 2)))}
            for i in range(6)]
    (tmp_path / "text.json").write_text(json.dumps(text))
    sources = [InstructionSource("vis", str(tmp_path / "vis.json"), "llava", image_root=str(tmp_path / "img")),
               InstructionSource("text", str(tmp_path / "text.json"), "alpaca")]

    model = build_model(cfg)

    @nnx.jit
    def per_token_nll(m, batch):
        hidden = m(batch["tokens"], positions=batch["positions"], segment_ids=batch["segment_ids"],
                   pixel_values=batch["pixel_values"], image_index=batch["image_index"])
        return token_nll(hidden, m.language_model.output_kernel(), batch["targets"], chunk_size=m.loss_chunk_size)

    def losses(packing, batches):
        """{global sample index: (per-token NLL at its loss positions, number of images)}."""
        p = InstructionPipeline(sources, tokenizer=TOK, seq_len=128, rows=4, image_budget=8, image_size=size,
                                tokens_per_image=tpi, train=False, packing=packing, epochs=1)
        out = {}
        for _ in range(batches):
            batch = next(p)
            nll = np.asarray(jax.device_get(per_token_nll(model, batch)))
            for info in p.last_batch:
                seg = batch["segment_ids"][info.row]
                n = int((seg == info.segment).sum())
                span = slice(info.start, info.start + n)
                mask = batch["loss_mask"][info.row, span]
                out[info.index] = (nll[info.row, span][mask], info.num_images)
        return out

    packed, alone = losses(True, 2), losses(False, 3)
    common = sorted(set(packed) & set(alone))
    assert len(common) >= 8 and {alone[g][1] for g in common} == {0, 1, 2}  # text, one and two images
    assert max(len(v) for v in packed.values()) > 0
    for g in common:
        assert len(packed[g][0]) == len(alone[g][0]) > 0
        np.testing.assert_allclose(packed[g][0], alone[g][0], atol=1e-5, rtol=0, err_msg=f"sample {g}")
        np.testing.assert_allclose(packed[g][0].mean(), alone[g][0].mean(), atol=1e-6, rtol=0)
