"""Trainable sets from the config (`training.trainable`, the presets of `training.stage`) and learning-rate
groups (`optimizer.param_groups`): the leaves each preset trains, by name and count, on both connectors;
frozen leaves bit-identical after steps while every trainable one moves; optimizer state for exactly the
trainable leaves, per group; each group's learning rate in the metrics and in the size of Adam's first
step; one-line errors for patterns that select nothing; and a tiny LLaVA through the train CLI (stage 1,
stage 2 from its checkpoint, generation from the run)."""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from owl_jax.config import ConfigError, load_config
from owl_jax.convert.state import canonical_params
from owl_jax.models.layers import path_str, user_path
from owl_jax.models.owl import build_model
from owl_jax.sharding import make_mesh
from owl_jax.training.stages import PRESETS, STAGES, resolve_trainable
from owl_jax.training.train_step import abstract_train_state, create_trainer
from helpers import cli_env, image_train_batch, write_colour_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# configs/model/tiny_llava.yaml on top of the tiny training recipe (as tests/test_llava.py)
TINY_LLAVA = ["model.connector=mlp2x_gelu", "model.vision_feature_layer=-2",
              "model.vision_feature_select_strategy=default", "model.vision.num_layers=3",
              "model.vision.layer_norm_eps=1e-5"]
# LLaVA-LoRA's targets, from the recipe itself: every LLM linear
ALL_LINEAR = "model.lora.targets=[" + ", ".join(
    f"'{t}'" for t in load_config(os.path.join(ROOT, "configs/llava15_7b_lora.yaml")).model.lora.targets) + "]"
FAST = ["model.lora.rank=4", "model.lora.dropout=0.0", "model.abstractor.attention_dropout=0.0"]


# configs/model/tiny_blip2.yaml on top of the tiny training recipe (as tests/test_blip2.py)
TINY_BLIP2 = ["model.connector=qformer", "model.vision.kind=blip2", "model.vision.hidden_act=gelu",
              "model.qformer.hidden_size=48", "model.qformer.num_layers=4", "model.qformer.num_heads=4",
              "model.qformer.intermediate_size=96", "model.qformer.num_queries=8", "model.qformer.vocab_size=128",
              "model.qformer.max_position_embeddings=32", "model.qformer.max_text_len=16"]
FAMILIES = {"owl": [], "llava": TINY_LLAVA, "blip2": TINY_BLIP2}


def tiny(family: str, *extra: str):
    return load_config(os.path.join(ROOT, "configs/tiny_test.yaml"), [*FAMILIES[family], *FAST, "mesh.fsdp=1", *extra])


def _parts(name: str) -> str:
    if ".lora." in name:
        return "lora"
    if name.startswith("vision_model.post_layernorm."):
        return "ln_vision"
    if name.startswith("qformer.language_projection."):
        return "projection"  # MiniGPT-4's llama_proj
    return re.sub("^(abstractor|projector|qformer)$", "connector", name.split(".")[0]) \
        .replace("vision_model", "vision").replace("language_model", "llm")


# preset -> (parts it trains, leaf count) on mPLUG-Owl, LLaVA and BLIP-2; None: the preset does not apply
# (a one-line StageError). Tiny models: rank-4 LoRA on q_proj / v_proj of 2 LLM layers (8 adapter leaves);
# CLIP tower 31 leaves (2 layers) / 43 (3 layers), BLIP-2 tower 30 + its post-LayerNorm (ln_vision) 2;
# abstractor 48, projector 4, Q-Former 89 (language_projection 2); LLM 21.
_QF = {"connector", "projection"}  # the whole Q-Former
_TOWER = {"vision", "ln_vision"}
PRESET_PARTS = {
    "pretrain": ((_TOWER | {"connector"}, 79), ({"connector"}, 4), (_QF, 89)),
    "owl_stage1": ((_TOWER | {"connector"}, 79), (_TOWER | {"connector"}, 47), (_TOWER | _QF, 121)),
    "owl_stage2_lora": (({"lora"}, 8), ({"lora"}, 8), ({"lora"}, 8)),
    "instruct_lora": (({"lora"}, 8), ({"lora"}, 8), ({"lora"}, 8)),
    "owl_stage2_paper": (({"lora", "connector"}, 56), ({"lora", "connector"}, 12), ({"lora"} | _QF, 97)),
    "llava_stage1": (({"connector"}, 48), ({"connector"}, 4), (_QF, 89)),
    "llava_stage2": (({"connector", "llm"}, 69), ({"connector", "llm"}, 25), (_QF | {"llm"}, 110)),
    "llava_lora": (({"lora", "connector"}, 56), ({"lora", "connector"}, 12), ({"lora"} | _QF, 97)),
    "instruct_full": (({"llm"}, 21), ({"llm"}, 21), ({"llm"}, 21)),
    "lm_pretrain": (({"llm"}, 21), ({"llm"}, 21), ({"llm"}, 21)),
    "minigpt4": (None, None, ({"projection"}, 2)),
    "blip2_stage2": (({"connector", "ln_vision"}, 50), ({"connector", "ln_vision"}, 6), (_QF | {"ln_vision"}, 91)),
    "instructblip": (({"connector", "ln_vision"}, 50), ({"connector", "ln_vision"}, 6), (_QF | {"ln_vision"}, 91)),
}


def test_every_stage_is_a_preset_with_its_recipe():
    assert set(PRESET_PARTS) == set(STAGES) == set(PRESETS) | {"pretrain"}
    assert all(p.recipe for p in PRESETS.values())


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("stage", sorted(PRESET_PARTS))
def test_each_preset_trains_its_leaves(family, stage):
    cfg = tiny(family, f"training.stage={stage}")
    model = nnx.eval_shape(lambda: build_model(cfg.model))
    params = [user_path(path_str(p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    expected = PRESET_PARTS[stage][list(FAMILIES).index(family)]
    if expected is None:
        with pytest.raises(ConfigError, match="language_projection is the Q-Former's projection"):
            resolve_trainable(model, cfg.training, cfg.model)
        return
    parts, count = expected
    ts = resolve_trainable(model, cfg.training, cfg.model)
    assert sorted(ts.names) == sorted(n for n in params if _parts(n) in parts)
    assert len(ts.names) == count


def test_llava_lora_recipe_targets_every_llm_linear():
    cfg = tiny("llava", "training.stage=llava_lora", ALL_LINEAR)
    model = nnx.eval_shape(lambda: build_model(cfg.model))
    names = set(resolve_trainable(model, cfg.training, cfg.model).names)
    linears = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj"]
    lora = {f"language_model.layers.{i}.{m}.lora.lora_{ab}" for i in (0, 1) for m in linears for ab in "ab"}
    projector = {f"projector.linear_{i}.{p}" for i in (1, 2) for p in ("kernel", "bias")}
    assert names == lora | projector and len(names) == 32  # no lm_head adapter, no base weight


def test_scanned_stacks_name_no_layer_index():
    cfg = tiny("llava", "training.stage=llava_lora", "model.scan_layers=true")
    model = nnx.eval_shape(lambda: build_model(cfg.model))
    names = resolve_trainable(model, cfg.training, cfg.model).names
    assert sorted(n for n in names if ".lora." in n) == sorted(
        f"language_model.layers.self_attn.{m}.lora.lora_{ab}" for m in ("q_proj", "v_proj") for ab in "ab")


def test_patterns_replace_the_preset_and_exclusions_apply():
    cfg = tiny("llava", r"training.trainable=['^language_model\.layers\.1\.', 'lm_head', '!post_attention_layernorm']")
    model = nnx.eval_shape(lambda: build_model(cfg.model))
    ts = resolve_trainable(model, cfg.training, cfg.model)
    assert ts.label == "training.trainable"
    want = {"language_model.lm_head.kernel", "language_model.layers.1.input_layernorm.scale"} | {
        f"language_model.layers.1.{m}.kernel" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                        "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                                        "mlp.down_proj")} | {
        f"language_model.layers.1.self_attn.{m}.lora.lora_{ab}" for m in ("q_proj", "v_proj") for ab in "ab"}
    assert set(ts.names) == want


# --------------------------------------------------------------------------------------------------------
# Training: frozen leaves bit-identical, trainable ones all moving, optimizer state for the trainable only
# --------------------------------------------------------------------------------------------------------


def _mu_paths(opt_state) -> list[str]:
    """Parameter paths of Adam's first moments."""
    out = set()
    for path, _ in nnx.to_flat_state(opt_state):
        path = [str(p) for p in path]
        if "mu" not in path:
            continue
        out.add(".".join(path[path.index("mu") + 1:]))
    return sorted(out)


@pytest.mark.parametrize("family, overrides", [
    ("owl", ["training.stage=owl_stage2_paper"]),
    ("llava", ["training.stage=llava_stage2"]),
    ("llava", ["training.stage=llava_lora", ALL_LINEAR]),
    ("llava", [r"training.trainable=['^language_model\.layers\.1\.', 'lm_head', '!post_attention_layernorm']"]),
], ids=["owl_stage2_paper", "llava_stage2", "llava_lora", "patterns"])
def test_frozen_leaves_stay_bit_identical_and_every_trainable_leaf_moves(family, overrides):
    cfg = tiny(family, *overrides, "optimizer.learning_rate=1e-2", "optimizer.weight_decay=0.01")
    batch = image_train_batch(cfg)
    trainer = create_trainer(cfg, make_mesh(cfg.mesh, jax.devices()[:1]), batch_example=batch)
    before = {k: np.asarray(v) for k, v in canonical_params(trainer.model()).items()}
    losses = [float(trainer.step(trainer.put_batch(batch))["loss"]) for _ in range(2)]  # LoRA a moves at step 2
    after = {k: np.asarray(v) for k, v in canonical_params(trainer.model()).items()}
    changed = sorted(k for k in before if not np.array_equal(before[k], after[k]))
    assert changed == sorted(trainer.trainable) and losses[1] < losses[0]
    ts = nnx.merge(trainer.graphdef, trainer.state)
    assert _mu_paths(nnx.state(ts.optimizer)) == sorted(trainer.trainable)  # no state for frozen leaves
    assert sorted(user_path(n) for n in trainer.trainable) == sorted(trainer.trainable_set.names)


def test_each_group_trains_at_its_own_learning_rate():
    """LLaVA-LoRA's two rates (scaled for a tiny model: adapters 1e-2, projector 1e-3): in the metrics and in
    Adam's first step, whose size per element is the learning rate (m / sqrt(v) = g / |g|)."""
    cfg = tiny("llava", "training.stage=llava_lora", ALL_LINEAR, "optimizer.learning_rate=1e-2",
               "optimizer.weight_decay=0.0", "optimizer.eps=1e-12", "optimizer.grad_clip_norm=0.0",
               r"optimizer.param_groups=[{name: projector, patterns: ['^projector\.'], learning_rate: 1e-3}]")
    batch = image_train_batch(cfg)
    trainer = create_trainer(cfg, make_mesh(cfg.mesh, jax.devices()[:1]), batch_example=batch)
    before = {k: np.asarray(v) for k, v in canonical_params(trainer.model()).items()}
    metrics = jax.device_get(trainer.step(trainer.put_batch(batch)))
    after = {k: np.asarray(v) for k, v in canonical_params(trainer.model()).items()}
    assert metrics["learning_rate"] == pytest.approx(1e-2) and metrics["learning_rate/projector"] == pytest.approx(1e-3)
    step = {k: float(np.abs(after[k] - before[k]).max()) for k in before}
    projector = [k for k in step if k.startswith("projector.")]
    lora_b = [k for k in step if k.endswith("lora_b")]
    assert len(projector) == 4 and len(lora_b) == 14
    np.testing.assert_allclose([step[k] for k in projector], 1e-3, rtol=1e-3)
    np.testing.assert_allclose([step[k] for k in lora_b], 1e-2, rtol=1e-3)
    # one AdamW over all trainable leaves (the groups differ in the rate of its last step only)
    assert _mu_paths(nnx.state(nnx.merge(trainer.graphdef, trainer.state).optimizer)) == sorted(trainer.trainable)


# --------------------------------------------------------------------------------------------------------
# Mistakes: one line each
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family, overrides, message", [
    ("llava", [r"training.trainable=['^projecter\.']"],
     r"training.trainable: pattern '^projecter\.' matches no parameter (paths look like language_model."),
    ("llava", [r"training.trainable=['^projector\.', '!vision']"],
     r"training.trainable: pattern '!vision' excludes none of the parameters the other patterns select"),
    ("llava", ["training.stage=llava_lora", "model.lora.rank=0"],
     r"training.stage llava_lora: pattern '\.lora_[ab]$' matches no parameter (the model has no LoRA adapters: "
     r"set model.lora.rank > 0)"),
    ("llava", ["model.scan_layers=true", r"training.trainable=['layers\.0\.']"],
     "with model.scan_layers a stack's leaves name no layer index"),
    ("llava", ["training.stage=pretrain", "model.connector=identity", "model.vision.hidden_size=96"],
     r"training.stage pretrain (llava_stage1): pattern '^projector\.' matches no parameter (the identity connector"),
    ("owl", ["training.stage=llava_lora", r"optimizer.param_groups=[{name: tower, patterns: [vision], learning_rate: 1e-5}]"],
     "optimizer.param_groups[0] (tower): patterns vision match no trainable parameter"),
])
def test_a_selection_of_nothing_is_a_one_line_config_error(family, overrides, message):
    cfg = tiny(family, *overrides)
    with pytest.raises(ConfigError) as e:
        abstract_train_state(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("override, message", [
    ("training.trainable=['!lora']", "only '!' patterns"),
    ("training.trainable=['']", "an empty pattern"),
    ("training.trainable=['proj(']", "training.trainable: invalid regular expression 'proj('"),
    ("optimizer.param_groups=[{name: default, patterns: [x], learning_rate: 1e-3}]", "and not 'default'"),
    ("optimizer.param_groups=[{name: a, patterns: [x], learning_rate: 1e-3}, {name: a, patterns: [y], "
     "learning_rate: 1e-3}]", "'a' names two groups"),
    ("optimizer.param_groups=[{name: a, patterns: [], learning_rate: 1e-3}]", "param_groups[0].patterns: empty"),
    ("optimizer.param_groups=[{name: a, patterns: [x]}]", "param_groups[0].learning_rate must be > 0"),
    ("optimizer.param_groups=[{name: a, patterns: [x], learning_rat: 1e-3}]", "did you mean 'learning_rate'"),
    ("optimizer.lr_multipliers={vision: 0.1}", "not both"),
])
def test_static_mistakes_fail_when_the_config_loads(override, message):
    extra = ["optimizer.param_groups=[{name: p, patterns: [x], learning_rate: 1e-3}]"] if "multipliers" in override else []
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(os.path.join(ROOT, "configs/tiny_test.yaml"), [*extra, override])


def test_the_train_cli_shows_a_pattern_that_matches_nothing_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "owl_jax.train", "--config", "configs/tiny_test.yaml",
                           r"training.trainable=['^vision_model\.patch_embedding']", "logging.tensorboard=false",
                           f"training.output_dir={tmp_path / 'run'}"], cwd=ROOT, env=cli_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        r"error: training.trainable: pattern '^vision_model\.patch_embedding' matches no parameter (paths look "
        "like abstractor.layers.0.attention.key.bias, language_model.embed_tokens, vision_model.cls_token)"]


# --------------------------------------------------------------------------------------------------------
# A tiny LLaVA end to end: stage 1 (projector) on caption shards, stage 2 (projector + LLM) from its
# checkpoint, both through the train CLI, then generation from the run
# --------------------------------------------------------------------------------------------------------

def test_tiny_llava_stage1_then_stage2_then_generation(tmp_path):
    shards, chat, images = write_colour_data(tmp_path)
    common = [*TINY_LLAVA, "data.num_workers=0", "data.global_batch_size=4", "data.images_per_batch=4",
              "data.seq_len=48", "training.steps=2", "training.checkpoint_every=2", "logging.tensorboard=false",
              "logging.progress=false", "mesh.fsdp=1"]
    stage1, stage2 = tmp_path / "stage1", tmp_path / "stage2"
    runs = {
        stage1: ["training.stage=llava_stage1", f"data.train_paths=['{shards}']"],
        stage2: ["training.stage=llava_stage2", "data.kind=instructions", "data.template=vicuna_v1",
                 "data.system_prompt=''",
                 f"data.sources=[{{name: chat, path: '{chat}', format: llava, image_root: '{images}'}}]",
                 f"init.from_checkpoint={stage1}",
                 # a learning-rate group, saved and restored with the run (its optimizer state included)
                 r"optimizer.param_groups=[{name: projector, patterns: ['^projector\.'], learning_rate: 1e-4}]"],
    }
    for (run_dir, overrides), leaves in zip(runs.items(), ("stage llava_stage1: 4", "stage llava_stage2: 25")):
        proc = subprocess.run([sys.executable, "-m", "owl_jax.train", "--config", "configs/tiny_test.yaml", *common,
                               *overrides, f"training.output_dir={run_dir}"], cwd=ROOT, env=cli_env(devices=1),
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"({leaves} trainable leaves" in proc.stdout and "done: step 2" in proc.stdout
    logged = [json.loads(line) for line in (stage2 / "metrics.jsonl").read_text().splitlines()]
    assert [r["learning_rate/projector"] for r in logged if "loss" in r] == pytest.approx([1e-4, 1e-4])
    from owl_jax.checkpoint import load_run
    cfg1, m1 = load_run(stage1)
    cfg2, m2 = load_run(stage2)
    assert (cfg1.training.stage, cfg2.training.stage) == ("llava_stage1", "llava_stage2")
    init = canonical_params(build_model(cfg1.model, seed=cfg1.training.seed))
    p1, p2 = canonical_params(m1), canonical_params(m2)
    for name in init:  # stage 1 moved the projector alone; stage 2 the projector and the LLM, not the tower
        part = _parts(name)
        assert np.array_equal(p1[name], init[name]) == (part != "connector"), name
        assert np.array_equal(p2[name], p1[name]) == (part in ("vision", "ln_vision")), name
    proc = subprocess.run([sys.executable, "-m", "owl_jax.generate", "--checkpoint", str(stage2), "--image",
                           str(images / "0.png"), "--prompt", "What colour is it?",
                           "--max-new-tokens", "3"], cwd=ROOT, env=cli_env(devices=1), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "error" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stdout.count("\n") == 1  # the answer (greedy, 3 tokens at most, of a model trained 2+2 steps)
