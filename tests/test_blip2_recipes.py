"""The Q-Former family's recipes run through the train CLI at tiny size: each published recipe
(`configs/minigpt4_vicuna7b_stage1.yaml`, `..._stage2.yaml`, `configs/instructblip_vicuna7b.yaml`) with the
tiny BLIP-2 / InstructBLIP model laid over its model section and tiny data, so that its own stage, template,
data kind and schedule are what trains. Asserted: the trainable leaves each recipe names (by count in the
CLI's line and by which parameters moved), stage 2 continuing from stage 1's checkpoint, InstructBLIP's
instructions reaching the Q-Former (its word embeddings move), and generation from the InstructBLIP run
through the generate CLI (the Q-Former reading the question)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import COLOURS, cli_env, colour_picture, write_colour_data

pytest.importorskip("torch")  # (tests/test_blip2.py's fixtures are not needed; kept with the family's tests)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["data.tokenizer=toy:512", "data.num_workers=0", "data.global_batch_size=4", "data.images_per_batch=4",
        "training.steps=2", "training.checkpoint_every=2", "optimizer.warmup_steps=1", "logging.tensorboard=false",
        "logging.progress=false", "mesh.fsdp=1",
        "model.frozen_param_dtype=float32"]  # the recipes store frozen weights in bf16; the tiny model compares bits


def _recipe(tmp_path, recipe: str, model: str) -> str:
    """`recipe` with the tiny model's sections laid over its model (a later base wins)."""
    path = tmp_path / f"{os.path.basename(recipe)}"
    path.write_text(f"base: [{os.path.join(ROOT, recipe)}, {os.path.join(ROOT, model)}]\n")
    return str(path)


def _train(config: str, run_dir, *overrides: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "owl_jax.train", "--config", config, *TINY, *overrides,
                           f"training.output_dir={run_dir}"], cwd=ROOT, env=cli_env(devices=1), capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "done: step 2" in proc.stdout
    return proc.stdout


def _moved(before: dict, after: dict) -> set[str]:
    return {k for k in before if not np.array_equal(before[k], after[k])}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Caption shards (stage 1) and LLaVA-format chat with images (InstructBLIP) from
    `helpers.write_colour_data`, a cc_sbu_align folder (MiniGPT-4 stage 2) and a WordPiece vocabulary for
    the Q-Former."""
    root = tmp_path_factory.mktemp("blip2_recipes")
    write_colour_data(root)
    rng = np.random.default_rng(1)
    names = list(COLOURS)
    (root / "align" / "image").mkdir(parents=True)
    annotations = []
    for i in range(8):
        colour_picture(names[i % 3], rng).save(root / "align" / "image" / f"{i}.jpg")
        annotations.append({"image_id": str(i), "caption": f"The picture is {names[i % 3]} all over."})
    (root / "align" / "filter_cap.json").write_text(json.dumps({"annotations": annotations}))
    (root / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "what", "colour", "is",
                                               "it", "?"]) + "\n")
    return root


def test_minigpt4_stage1_then_stage2_train_the_projection_only(tmp_path, data):
    from owl_jax.checkpoint import load_run
    from owl_jax.convert.state import canonical_params
    from owl_jax.models.owl import build_model
    stage1, stage2 = tmp_path / "stage1", tmp_path / "stage2"
    out = _train(_recipe(tmp_path, "configs/minigpt4_vicuna7b_stage1.yaml", "configs/model/tiny_blip2.yaml"), stage1,
                 f"data.train_paths=['{data}/c-{{000..001}}.tar']")
    assert "(stage minigpt4: 2 trainable leaves" in out
    out = _train(_recipe(tmp_path, "configs/minigpt4_vicuna7b_stage2.yaml", "configs/model/tiny_blip2.yaml"), stage2,
                 f"init.from_checkpoint={stage1}", "data.seq_len=64",
                 f"data.sources=[{{name: align, path: '{data}/align/filter_cap.json', format: cc_sbu_align}}]")
    assert "(stage minigpt4: 2 trainable leaves" in out
    cfg1, m1 = load_run(stage1)
    cfg2, m2 = load_run(stage2)
    assert (cfg2.data.template, cfg2.data.kind, cfg2.optimizer.learning_rate) == ("minigpt4", "instructions", 3e-5)
    init = canonical_params(build_model(cfg1.model, seed=cfg1.training.seed))
    p1, p2 = canonical_params(m1), canonical_params(m2)
    projection = {"qformer.language_projection.kernel", "qformer.language_projection.bias"}
    assert _moved(init, p1) == projection and _moved(p1, p2) == projection


def test_instructblip_recipe_trains_the_qformer_and_generates_from_the_question(tmp_path, data):
    from owl_jax.checkpoint import load_run
    from owl_jax.convert.state import canonical_params
    from owl_jax.models.owl import build_model
    from owl_jax.training.stages import resolve_trainable
    run = tmp_path / "instructblip"
    config = _recipe(tmp_path, "configs/instructblip_vicuna7b.yaml", "configs/model/tiny_instructblip.yaml")
    out = _train(config, run, "model.text.pad_token_id=0", "data.seq_len=64", f"data.qformer_tokenizer={data}/vocab.txt",
                 f"data.sources=[{{name: ib, path: '{data}/chat.json', format: llava, "
                 f"image_root: '{data}/images'}}]")
    cfg, model = load_run(run)
    assert cfg.training.stage == "instructblip" and cfg.data.template == "instructblip"
    trainable = set(resolve_trainable(model, cfg.training, cfg.model).names)
    assert f"(stage instructblip: {len(trainable)} trainable leaves" in out
    moved = _moved(canonical_params(build_model(cfg.model, seed=cfg.training.seed)), canonical_params(model))
    assert all(k.startswith(("qformer.", "vision_model.post_layernorm.")) for k in moved)  # nothing else moved
    assert {"qformer.word_embeddings", "vision_model.post_layernorm.scale", "qformer.query_tokens"} <= moved
    proc = subprocess.run([sys.executable, "-m", "owl_jax.generate", "--checkpoint", str(run), "--image",
                           str(data / "images" / "0.png"), "--prompt", "What colour is it?", "--max-new-tokens", "3"],
                          cwd=ROOT, env=cli_env(devices=1), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "error" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stdout.count("\n") == 1


def test_blip2_stage2_caption_pretraining_on_caption_shards(tmp_path, data):
    """BLIP-2's LLM-facing stage on the caption shards every recipe reads: the Q-Former, its queries, the
    projection and ln_vision train against the frozen LLM; the tower's blocks and the LLM stay put."""
    from owl_jax.checkpoint import load_run
    from owl_jax.convert.state import canonical_params
    from owl_jax.models.owl import build_model
    run = tmp_path / "blip2_stage2"
    config = tmp_path / "recipe.yaml"
    config.write_text(f"base: [{ROOT}/configs/tiny_test.yaml, {ROOT}/configs/model/tiny_blip2.yaml]\n")
    out = _train(str(config), run, "training.stage=blip2_stage2", f"data.train_paths=['{data}/c-{{000..001}}.tar']")
    assert "(stage blip2_stage2: 91 trainable leaves" in out
    cfg, model = load_run(run)
    moved = _moved(canonical_params(build_model(cfg.model, seed=cfg.training.seed)), canonical_params(model))
    assert {"qformer.query_tokens", "qformer.language_projection.kernel", "vision_model.post_layernorm.scale"} <= moved
    assert all(k.startswith(("qformer.", "vision_model.post_layernorm.")) for k in moved)
