"""The end-to-end comparison's batches (benchmarks/vs_official.py --end-to-end), without the official code:
rows padded to the official layout carry one sample each, with the masks its forward reads, and samples
are counted per packed segment. (The comparison itself needs the official venv: tests/test_vs_official.py.)"""

from __future__ import annotations

import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import vs_official  # noqa: E402


def test_padded_rows_and_packed_sample_counts(tmp_path):
    from data_pipelines.synthetic import make_world
    from data_pipelines.tokenizers import load_tokenizer
    from owl_jax.config import load_config
    from owl_jax.data import make_pipeline
    world = make_world(tmp_path / "world", num_train_pictures=24, num_eval_pictures=2, num_text_instructions=8,
                       num_reading_conversations=8, num_caption_readings=8, samples_per_shard=24)
    common = vs_official.COMMON + vs_official.E2E_MODEL + vs_official.STAGES[1] + vs_official.E2E_DATA["captions"](
        world) + [f"data.tokenizer={world['tokenizer']}", "data.seq_len=256", "data.num_workers=0",
                  "data.augment=false", "data.hflip=false"]
    tok = load_tokenizer(world["tokenizer"])
    padded = make_pipeline(load_config(os.path.join(ROOT, "configs/tiny_test.yaml"), common + [
        "data.packing=false", "data.global_batch_size=2", "data.images_per_batch=2"]), tok)
    packed = make_pipeline(load_config(os.path.join(ROOT, "configs/tiny_test.yaml"), common + [
        "data.packing=true", "data.global_batch_size=1", "data.images_per_batch=8"]), tok)
    try:
        one, many = next(iter(padded)), next(iter(packed))
    finally:
        padded.close()
        packed.close()
    inputs = vs_official._official_padded(one)
    real = one["segment_ids"] > 0
    assert vs_official._samples(one) == 2 and inputs["num_images"].tolist() == [1, 1]
    assert (inputs["attention_mask"] == real).all() and (inputs["input_ids"][~real] == 0).all()
    assert (inputs["input_ids"] < 0).sum() == 2 * 17  # 16 queries + vit_eos per image
    np.testing.assert_array_equal(inputs["prompt_mask"], one["loss_mask"][:, :-1])
    assert inputs["pixel_values"].shape == (2, 3, 112, 112)
    assert vs_official._samples(many) == int((many["tokens"] < 0).sum() // 17) > 2  # one image per sample
