"""Schedules, weight-decay mask, learning-rate groups (and the older multipliers), frozen weights in bf16."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from owl_jax.config import ConfigError, OptimizerConfig, ParamGroupConfig, load_config
from owl_jax.models.owl import build_model
from owl_jax.sharding import make_mesh
from owl_jax.training.optimizer import check_param_groups, decay_mask, learning_rate_schedule, make_optimizer
from owl_jax.training.train_step import create_trainer


def test_warmup_then_cosine_linear_constant():
    cfg = OptimizerConfig(learning_rate=1.0, warmup_steps=10, schedule="cosine", end_learning_rate_ratio=0.1)
    s = learning_rate_schedule(cfg, total_steps=110)
    assert float(s(0)) == 0.0 and abs(float(s(5)) - 0.5) < 1e-6 and abs(float(s(10)) - 1.0) < 1e-6
    assert abs(float(s(60)) - 0.55) < 1e-3 and abs(float(s(110)) - 0.1) < 1e-6
    lin = learning_rate_schedule(dataclasses.replace(cfg, schedule="linear", end_learning_rate_ratio=0.0), 110)
    assert abs(float(lin(60)) - 0.5) < 1e-6 and float(lin(110)) == 0.0
    const = learning_rate_schedule(dataclasses.replace(cfg, schedule="constant"), 110)
    assert float(const(10)) == float(const(1000)) == 1.0


def test_weight_decay_only_on_matrices():
    model = build_model(load_config("configs/model/tiny.yaml").model)
    mask = decay_mask(nnx.state(model, nnx.Param))
    flat = {".".join(map(str, p)): bool(v.get_value() if isinstance(v, nnx.Variable) else v)
            for p, v in nnx.to_flat_state(mask)}
    assert flat["language_model.layers.layers.0.self_attn.q_proj.kernel"]
    assert flat["vision_model.patch_embed"] and flat["language_model.embed_tokens"]
    for name in ["abstractor.query_tokens", "abstractor.vit_eos", "vision_model.cls_token",
                 "vision_model.position_embedding", "vision_model.pre_layernorm.scale",
                 "abstractor.layers.layers.0.attention.query.bias", "language_model.norm.scale"]:
        assert not flat[name], name


def test_learning_rate_multipliers_scale_updates():
    """Plain SGD-like check: with multipliers {vision: 0.1} the vision update is 10x smaller than the same
    Adam update without the multiplier (Adam's first step is lr*sign(g))."""
    params = {"vision_model": {"w": jnp.ones((3,))}, "abstractor": {"w": jnp.ones((3,))}}
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    cfg = OptimizerConfig(learning_rate=1e-2, schedule="constant", grad_clip_norm=0.0,
                          lr_multipliers={r"^vision_model": 0.1})
    tx, _ = make_optimizer(cfg, 10)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["vision_model"]["w"], -1e-3, rtol=1e-4)
    np.testing.assert_allclose(updates["abstractor"]["w"], -1e-2, rtol=1e-4)


def test_param_groups_train_at_their_own_rate_with_the_shared_schedule_shape():
    """Two groups and the default: each leaf's Adam step is its group's rate (first step: lr * sign(g)), the
    schedules have one shape (warmup, cosine) scaled to each peak, the first matching group wins, and the
    optimizer state is a plain AdamW's (what checkpoints hold), groups or not."""
    params = {"projector": {"kernel": jnp.ones((3,))}, "language_model": {"lora_a": jnp.ones((2,)),
              "embed_tokens": jnp.ones((2,))}}
    grads = jax.tree.map(lambda p: jnp.full_like(p, -0.5), params)
    groups = [ParamGroupConfig("projector", [r"^projector\."], 2e-5), ParamGroupConfig("embed", ["embed", "proj"], 1e-6)]
    cfg = OptimizerConfig(learning_rate=2e-4, schedule="cosine", warmup_steps=2, grad_clip_norm=0.0, param_groups=groups)
    tx, lrs = make_optimizer(cfg, 10)
    for step in (1, 2, 5, 9):
        assert float(lrs.groups["projector"](step)) == pytest.approx(0.1 * float(lrs(step)), rel=1e-6)
        assert float(lrs.groups["embed"](step)) == pytest.approx(0.005 * float(lrs(step)), rel=1e-6)
    state = tx.init(params)
    updates, state = tx.update(grads, state, params)  # step 0: warmup gives lr 0
    assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(updates))
    updates, _ = tx.update(grads, state, params)  # step 1: half the peak
    np.testing.assert_allclose(updates["projector"]["kernel"], 1e-5, rtol=1e-4)
    np.testing.assert_allclose(updates["language_model"]["embed_tokens"], 5e-7, rtol=1e-4)
    np.testing.assert_allclose(updates["language_model"]["lora_a"], 1e-4, rtol=1e-4)
    plain, _ = make_optimizer(OptimizerConfig(learning_rate=2e-4, grad_clip_norm=0.0), 10)
    assert jax.tree.structure(tx.init(params)) == jax.tree.structure(plain.init(params))


def test_groups_are_matched_against_the_trainable_leaves():
    cfg = OptimizerConfig(param_groups=[ParamGroupConfig("projector", [r"^projector\."], 2e-5)])
    names = ["projector.linear_1.kernel", "projector.linear_1.bias", "language_model.layers.0.mlp.up_proj.lora.lora_a"]
    assert check_param_groups(cfg, names) == {"projector": 2, "default": 1}
    with pytest.raises(ConfigError, match=r"param_groups\[0\] \(projector\).*match no trainable parameter"):
        check_param_groups(cfg, names[2:])
    legacy = OptimizerConfig(lr_multipliers={"vision_model": 0.1})  # as before: never checked
    assert check_param_groups(legacy, names) == {"lr_x0": 0, "default": 3}


def test_frozen_weights_can_live_in_bfloat16():
    cfg = load_config("configs/tiny_test.yaml", ["model.frozen_param_dtype=bfloat16", "mesh.fsdp=1"])
    trainer = create_trainer(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))
    model = trainer.model()
    dtypes = {".".join(map(str, p)): v.dtype for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert dtypes["language_model.layers.layers.0.mlp.up_proj.kernel"] == jnp.bfloat16  # frozen in pretrain
    assert dtypes["vision_model.layers.layers.0.mlp.fc1.kernel"] == jnp.float32  # trainable master copy
    assert all(d == jnp.float32 for n, d in dtypes.items() if n.startswith(("vision_model", "abstractor")))
    from test_training import make_batch
    batch, _ = make_batch(cfg, rows=4, budget=4, images=(1, 0, 1, 0))
    metrics = [trainer.step(trainer.put_batch(batch)) for _ in range(2)]
    assert float(metrics[1]["loss"]) < float(metrics[0]["loss"]) and int(metrics[1]["skipped"]) == 0
