"""MiniGPT-4's `cc_sbu_align` source and InstructBLIP's `qformer_tokens` in the instruction pipeline.

cc_sbu_align (`filter_cap.json` + `image/<image_id>.jpg`) becomes MiniGPT-4's stage-2 samples in the
`minigpt4` template, each with an align prompt drawn from the pipeline's seed and the sample's index (the
same on a re-run). With a Q-Former tokenizer (a tiny WordPiece vocab.txt written here) the batch carries
`qformer_tokens` [image slots, L]: each image's instruction, `[CLS] ... [SEP]`, -1-padded, in pixel_values'
slot order; the tiny InstructBLIP model trains on that batch with a finite loss that depends on them.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from PIL import Image

from data_pipelines.conversation import ALIGN_PROMPTS, read_record
from data_pipelines.instructions import InstructionPipeline, InstructionSource
from data_pipelines.templates import get_template
from data_pipelines.tokenize import to_training_sample
from data_pipelines.tokenizers import ToyWordTokenizer, WordPieceTokenizer

TOK = ToyWordTokenizer(512)
TPI, SIZE = 8, 56
WORDS = ["what", "colour", "is", "this", "describe", "it", "the", "picture", "?", "."]


def _pipeline(sources, **kw):
    args = dict(tokenizer=TOK, seq_len=96, rows=4, image_budget=4, image_size=SIZE, tokens_per_image=TPI, seed=0,
                train=False, epochs=1)
    args.update(kw)
    return InstructionPipeline(sources, **args)


@pytest.fixture(scope="module")
def cc_sbu(tmp_path_factory):
    d = tmp_path_factory.mktemp("cc_sbu_align")
    (d / "image").mkdir()
    anns = [{"image_id": str(i), "caption": f"a picture of colour number {i} in the middle"} for i in range(6)]
    for i in range(6):
        Image.new("RGB", (8, 6), (40 * i, 200 - 30 * i, 90)).save(d / "image" / f"{i}.jpg")
    (d / "filter_cap.json").write_text(json.dumps({"annotations": anns}))
    return InstructionSource("align", str(d / "filter_cap.json"), "cc_sbu_align"), anns


def test_cc_sbu_align_gives_minigpt4_stage2_samples(cc_sbu):
    source, anns = cc_sbu
    p = _pipeline([source], template="minigpt4", rows=6, image_budget=6)
    batch = next(p)
    template = get_template("minigpt4")
    variants = set()
    for info in p.last_batch:
        variant = p._variant(info.index)
        variants.add(variant % len(ALIGN_PROMPTS))
        conv = template.with_system(read_record(anns[info.record], "cc_sbu_align", markers=template.markers,
                                                variant=variant), None)
        want = to_training_sample(conv, TOK, 96, TPI, template=template)
        np.testing.assert_array_equal(batch["tokens"][info.row, :len(want)], want.tokens)
        np.testing.assert_array_equal(batch["loss_mask"][info.row, :len(want)], want.loss_mask)
        assert info.num_images == 1
    assert len(variants) > 1 and p.skip_counts() == {}  # the align prompts are drawn, not fixed
    again = next(_pipeline([source], template="minigpt4", rows=6, image_budget=6))
    np.testing.assert_array_equal(again["tokens"], batch["tokens"])  # deterministic from the seed


def test_a_cc_sbu_align_file_without_annotations_is_refused(tmp_path):
    from data_pipelines.instructions import DataError
    (tmp_path / "filter_cap.json").write_text(json.dumps([{"image_id": "1", "caption": "x"}]))
    with pytest.raises(DataError, match="not a cc_sbu_align file"):
        _pipeline([InstructionSource("a", str(tmp_path / "filter_cap.json"), "cc_sbu_align")], template="minigpt4")


@pytest.fixture(scope="module")
def qformer_vocab(tmp_path_factory):
    path = tmp_path_factory.mktemp("wordpiece") / "vocab.txt"
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def llava_source(tmp_path_factory):
    d = tmp_path_factory.mktemp("ib")
    records = []
    for i, question in enumerate(["What colour is this?", "Describe the picture.", "What is it?"]):
        Image.new("RGB", (8, 6), (70 * i, 30, 200 - 50 * i)).save(d / f"{i}.png")
        records.append({"image": f"{i}.png", "conversations": [{"from": "human", "value": f"<image>\n{question}"},
                                                               {"from": "gpt", "value": f"answer {i} it is"}]})
    records.append({"conversations": [{"from": "human", "value": "Say one."}, {"from": "gpt", "value": "one"}]})
    (d / "data.json").write_text(json.dumps(records))
    return InstructionSource("ib", str(d / "data.json"), "llava", image_root=str(d)), records


def test_qformer_tokens_hold_each_images_instruction(llava_source, qformer_vocab):
    source, records = llava_source
    qtok = WordPieceTokenizer(qformer_vocab, max_len=6)
    p = _pipeline([source], template="instructblip", image_budget=4, qformer_tokenizer=qtok, qformer_text_len=6)
    batch = next(p)
    q = batch["qformer_tokens"]
    assert q.shape == (4, 6) and q.dtype == np.int32
    slot = 0
    for info in sorted(p.last_batch, key=lambda i: i.row):  # rows in order = image slots in order
        if not info.num_images:
            continue
        question = records[info.record]["conversations"][0]["value"].split("\n", 1)[1]
        want = qtok.encode(question)
        assert want[0] == 2 and want[-1] == 3 and len(want) <= 6  # [CLS] ... [SEP], truncated at max_len
        np.testing.assert_array_equal(q[slot, :len(want)], want)
        assert (q[slot, len(want):] == -1).all()
        slot += 1
    assert slot == 3 and (q[3] == -1).all()  # the unused slot is all padding
    # the image's slots sit at the start of its row, before BOS (InstructBLIP's order)
    row = next(i.row for i in p.last_batch if i.num_images)
    assert (batch["tokens"][row, :TPI] == -1).all() and batch["tokens"][row, TPI] == TOK.bos_id


def test_instructblip_trains_on_a_pipeline_batch_and_reads_its_instruction(llava_source, qformer_vocab, tmp_path):
    import jax.numpy as jnp
    from flax import nnx
    from owl_jax.config import SourceConfig, load_config
    from owl_jax.data import batch_keys, make_pipeline
    from owl_jax.models.owl import build_model
    source, _ = llava_source
    cfg = load_config("configs/model/tiny_instructblip.yaml", [
        "data.kind=instructions", "data.template=instructblip", f"data.qformer_tokenizer={qformer_vocab}",
        "data.seq_len=96", "data.global_batch_size=4", "data.images_per_batch=4", "data.augment=false",
        "training.stage=pretrain", "model.qformer.max_text_len=6", "model.qformer.num_layers=2",
        "model.vision.num_layers=1", "model.text.num_layers=1"])
    cfg.data.sources = [SourceConfig(name="ib", path=source.path, format="llava", image_root=source.image_root)]
    assert "qformer_tokens" in batch_keys(cfg)
    pipe = make_pipeline(cfg, TOK, epochs=1)
    batch = {k: v for k, v in next(pipe).items() if k in batch_keys(cfg)}
    model = build_model(cfg.model)
    model.eval()
    loss = nnx.jit(lambda m, b: m.loss_terms(b))

    def mean_loss(b):
        total, count = loss(model, {k: jnp.asarray(v) for k, v in b.items()})
        return float(total) / float(count)

    base = mean_loss(batch)
    other = dict(batch, qformer_tokens=np.where(batch["qformer_tokens"] >= 0, 5, -1).astype(np.int32))
    assert np.isfinite(base) and abs(mean_loss(other) - base) > 1e-6
    # the sharded train step takes the same batch, with abstract_batch declaring qformer_tokens (AOT, shardings)
    from owl_jax.sharding import make_mesh
    from owl_jax.training.train_step import abstract_batch, create_trainer
    assert abstract_batch(cfg)["qformer_tokens"].shape == batch["qformer_tokens"].shape
    cfg.mesh.fsdp = 4
    trainer = create_trainer(cfg, make_mesh(cfg.mesh, jax.devices()[:4]), batch_example=batch)
    metrics = trainer.step(trainer.put_batch(batch))
    assert np.isfinite(float(metrics["loss"]))
