"""All three demo stages on a small demo world, a few steps each, each stage starting from the previous
stage's checkpoint, then export-free evaluation of the result."""

import json

import numpy as np
import pytest

from data_pipelines.synthetic import make_world
from owl_jax.config import load_config
from owl_jax.evaluate import caption_matching_accuracy, multiple_choice_accuracy
from owl_jax.checkpoint import load_run
from owl_jax.convert.state import canonical_params
from owl_jax.train import run


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(str(tmp_path_factory.mktemp("world")), num_train_pictures=40, num_eval_pictures=8,
                      num_text_instructions=40, num_reading_conversations=40, num_caption_readings=40,
                      samples_per_shard=20)


def stage_config(name, world, runs, **extra):
    overrides = [f"data.tokenizer={world['tokenizer']}", "training.log_every=1", "training.checkpoint_every=100",
                 "data.global_batch_size=8", "data.images_per_batch=8", "logging.progress=false",
                 "logging.tensorboard=false", f"training.output_dir={runs}/{name}", "training.steps=3",
                 "training.eval_every=0", "mesh.fsdp=-1"]
    if name == "lm":
        overrides.append(f"data.sources=[{{name: t, path: '{world['alpaca_train']}', format: alpaca}}, "
                         f"{{name: r, path: '{world['reading_train']}', format: llava}}, "
                         f"{{name: c, path: '{world['caption_reading_train']}', format: llava}}]")
    elif name == "stage1":
        overrides += [f"data.train_paths=['{world['captions_train']}']", f"init.from_checkpoint={runs}/lm"]
    else:
        overrides += [f"data.sources=[{{name: v, path: '{world['vqa_train']}', format: llava, image_root: "
                      f"'{world['image_root']}', weight: 3.0}}, {{name: t, path: '{world['alpaca_train']}', "
                      f"format: alpaca, weight: 1.0}}]", f"init.from_checkpoint={runs}/stage1"]
    return load_config(f"configs/demo_{name}.yaml", overrides + [f"{k}={v}" for k, v in extra.items()])


def test_three_stages_then_evaluation(world, tmp_path):
    runs = tmp_path / "runs"
    results = {}
    for name in ("lm", "stage1", "stage2"):
        metrics = run(stage_config(name, world, runs))
        assert metrics["step"] == 3 and metrics["loss"] == metrics["loss"]  # finite
        results[name] = json.loads((runs / name / "metrics.jsonl").read_text().splitlines()[-1])
    # each stage trained what it should: stage 2 starts from stage 1's vision weights, with LoRA only
    cfg, model = load_run(runs / "stage2")
    assert cfg.training.stage == "instruct_lora" and cfg.model.lora.rank == 8
    _, stage1 = load_run(runs / "stage1")
    p1, p2 = canonical_params(stage1), canonical_params(model)
    key = "vision_model.layers.layers.0.mlp.fc1.kernel"
    np.testing.assert_array_equal(p1[key], p2[key])

    with open(world["eval_vqa"]) as f:
        questions = [json.loads(line) for line in f][:10]
    vqa = multiple_choice_accuracy(cfg, model, load_tokenizer(cfg), questions, world["image_root"])
    assert vqa["all"]["count"] == 10 and 0.0 <= vqa["all"]["accuracy"] <= 1.0
    with open(world["eval_captions"]) as f:
        captions = [json.loads(line) for line in f][:6]
    cfg1, _ = load_run(runs / "stage1")
    cap = caption_matching_accuracy(cfg1, stage1, load_tokenizer(cfg1), captions, world["image_root"], num_choices=3)
    assert cap["captions"]["count"] == 6 and cap["captions"]["chance"] == pytest.approx(1 / 3)


def load_tokenizer(cfg):
    from data_pipelines.tokenizers import load_tokenizer as load
    return load(cfg.data.tokenizer)
