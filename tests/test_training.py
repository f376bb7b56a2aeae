"""The sharded train step: mesh-shape equivalence with one device (all stages), frozen leaves untouched,
optimizer state exactly over the trainable leaves, gradient accumulation, one compile per run."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from owl_jax.compile_counter import count_compiles
from owl_jax.config import load_config
from owl_jax.convert.state import canonical_params
from owl_jax.models.splice import plan_micro_batched_slots
from owl_jax.sharding import MeshError, make_mesh, resolve_mesh_shape
from owl_jax.training.stages import StageError
from owl_jax.training.train_step import create_trainer

# A deliberately small model (one layer per part) so that the mesh matrix compiles quickly; dropout off so
# that runs on different meshes are comparable; Adam's eps raised so that parameters with near-zero
# gradients do not turn float-rounding noise into full-size updates (which would make the comparison of
# updated parameters ill-conditioned without testing anything more).
OVERRIDES = ["model.vision.num_layers=1", "model.abstractor.num_layers=1", "model.text.num_layers=1",
             "model.lora.rank=4", "model.lora.dropout=0.0", "model.abstractor.attention_dropout=0.0",
             "optimizer.eps=1e-3", "optimizer.learning_rate=1e-2", "optimizer.weight_decay=0.01"]
MESHES = [(1, 1, 1), (8, 1, 1), (2, 2, 2), (1, 2, 4), (2, 4, 1)]
STAGES = ["pretrain", "instruct_lora", "instruct_full", "lm_pretrain"]
TPI = 9


def config(stage, *extra):
    return load_config("configs/tiny_test.yaml", [*OVERRIDES, f"training.stage={stage}", *extra])


def make_batch(cfg, *, rows=8, seq=40, images=(1, 0, 1, 1, 0, 0, 1, 0), budget=8, micro=1, seed=0):
    """Host batch with images placed for `micro` micro-batches (text-only when the stage has no images)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, cfg.model.text.vocab_size, size=(rows, seq))
    images = np.array(images if cfg.training.stage != "lm_pretrain" else [0] * rows)
    for r, n in enumerate(images):
        ids[r, 2:2 + n * TPI] = -1
    index, pixel_row = plan_micro_batched_slots(ids, images, tokens_per_image=TPI, image_budget=budget,
                                                num_micro_batches=micro)
    pixels = np.zeros((budget, 56, 56, 3), np.float32)
    drawn = rng.normal(size=(len(pixel_row), 56, 56, 3)).astype(np.float32)
    pixels[pixel_row] = drawn
    targets = np.roll(ids, -1, axis=1).clip(0)
    mask = (ids >= 0) & (np.roll(ids, -1, axis=1) >= 0)
    mask[:, -1] = False
    batch = dict(tokens=ids.astype(np.int32), targets=targets.astype(np.int32), loss_mask=mask,
                 positions=np.broadcast_to(np.arange(seq, dtype=np.int32), ids.shape).copy(),
                 segment_ids=np.ones_like(ids, dtype=np.int32))
    if cfg.training.stage != "lm_pretrain":
        batch.update(pixel_values=pixels, image_index=index)
    return batch, drawn


def run(cfg, mesh_shape, batch, steps=3):
    cfg = dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, data=mesh_shape[0], fsdp=mesh_shape[1],
                                                            tensor=mesh_shape[2]))
    mesh = make_mesh(cfg.mesh, jax.devices()[:int(np.prod(mesh_shape))])
    trainer = create_trainer(cfg, mesh, batch_example=batch)
    initial = {k: np.asarray(v) for k, v in canonical_params(trainer.model()).items()}
    with count_compiles() as compiles:
        metrics = [jax.device_get(trainer.step(trainer.put_batch(batch))) for _ in range(steps)]
    final = {k: np.asarray(v) for k, v in canonical_params(trainer.model()).items()}
    return trainer, metrics, initial, final, compiles


@pytest.mark.parametrize("stage", STAGES)
def test_every_mesh_matches_one_device(stage):
    cfg = config(stage)
    batch, _ = make_batch(cfg)
    ref_trainer, ref_metrics, ref_initial, ref_final, compiles = run(cfg, (1, 1, 1), batch)
    assert compiles["jit(step)"] == 1
    trainable = set(ref_trainer.trainable)
    assert ref_metrics[-1]["loss"] < ref_metrics[0]["loss"]
    for mesh_shape in MESHES[1:]:
        _, metrics, initial, final, compiles = run(cfg, mesh_shape, batch)
        assert compiles["jit(step)"] == 1, mesh_shape
        for m, r in zip(metrics, ref_metrics):
            np.testing.assert_allclose(m["loss"], r["loss"], rtol=1e-6, err_msg=str(mesh_shape))
            np.testing.assert_allclose(m["grad_norm"], r["grad_norm"], rtol=1e-5, err_msg=str(mesh_shape))
        for name, value in final.items():
            np.testing.assert_allclose(value, ref_final[name], atol=2e-6, rtol=1e-5,
                                       err_msg=f"{name} on mesh {mesh_shape}")
        frozen = [k for k in final if not _is_trainable(k, trainable)]
        assert frozen and all(np.array_equal(final[k], initial[k]) for k in frozen)  # bit-identical
    moved = [k for k in ref_final if _is_trainable(k, trainable)
             and not np.array_equal(ref_final[k], ref_initial[k])]
    assert moved, "no trainable parameter changed"


def _is_trainable(canonical_name, trainable_paths):
    """Trainable paths are in the model's real layout (unrolled here, so identical to canonical names)."""
    return canonical_name in trainable_paths


EXPECTED_TRAINABLE = {
    "pretrain": lambda n: n.startswith(("vision_model.", "abstractor.")) and ".lora." not in n,
    "instruct_lora": lambda n: ".lora." in n,
    "instruct_full": lambda n: n.startswith("language_model.") and ".lora." not in n,
    "lm_pretrain": lambda n: n.startswith("language_model.") and ".lora." not in n,
}


@pytest.mark.parametrize("stage", STAGES)
def test_optimizer_state_holds_exactly_the_trainable_leaves(stage):
    cfg = config(stage)
    mesh = make_mesh(dataclasses.replace(cfg.mesh, data=1, fsdp=1, tensor=1), jax.devices()[:1])
    trainer = create_trainer(cfg, mesh)
    ts = nnx.merge(trainer.graphdef, trainer.state)
    params = canonical_params(ts.model)
    expected = sorted(n for n in params if EXPECTED_TRAINABLE[stage](n))
    assert sorted(trainer.trainable) == expected
    # Adam's first moment mirrors the trainable leaves exactly (names and count), nothing for frozen ones.
    mu_paths = sorted({".".join(str(p) for p in path[path.index("mu") + 1:])
                       for path, _ in nnx.to_flat_state(nnx.state(ts.optimizer))
                       if "mu" in path})
    assert mu_paths == expected
    if stage == "instruct_lora":
        assert len(expected) == 2 * 2 * cfg.model.text.num_layers  # a, b on q_proj and v_proj


def test_lora_stage_without_adapters_is_an_error():
    cfg = config("instruct_lora", "model.lora.rank=0")
    mesh = make_mesh(dataclasses.replace(cfg.mesh, data=1, fsdp=1, tensor=1), jax.devices()[:1])
    with pytest.raises(StageError, match="model.lora.rank"):
        create_trainer(cfg, mesh)


def test_micro_batches_equal_one_large_batch():
    """4 micro-batches of 2 rows == one batch of 8 rows: same loss, token count and updated parameters."""
    cfg = config("pretrain")
    one, _ = make_batch(cfg, micro=1)
    four, _ = make_batch(cfg, micro=4)
    _, m1, _, p1, _ = run(cfg, (2, 2, 1), one, steps=2)
    cfg4 = config("pretrain", "training.grad_accum_steps=4")
    _, m4, _, p4, compiles = run(cfg4, (2, 2, 1), four, steps=2)
    assert compiles["jit(step)"] == 1
    for a, b in zip(m1, m4):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-6)
        assert a["tokens"] == b["tokens"]
    for k in p1:
        np.testing.assert_allclose(p4[k], p1[k], atol=2e-6, rtol=1e-5, err_msg=k)


def test_non_finite_loss_skips_the_update():
    cfg = config("pretrain")
    batch, _ = make_batch(cfg)
    batch["pixel_values"] = np.full_like(batch["pixel_values"], np.nan)
    _, metrics, initial, final, _ = run(cfg, (1, 1, 1), batch, steps=1)
    assert metrics[0]["skipped"] == 1
    assert all(np.array_equal(final[k], initial[k]) for k in final)


def test_mesh_shape_errors():
    cfg = config("pretrain").mesh
    assert resolve_mesh_shape(dataclasses.replace(cfg, data=2, fsdp=-1, tensor=2), 8) == (2, 2, 2)
    with pytest.raises(MeshError, match="not a multiple"):
        resolve_mesh_shape(dataclasses.replace(cfg, data=3, fsdp=-1, tensor=1), 8)
    with pytest.raises(MeshError, match="16 devices"):
        resolve_mesh_shape(dataclasses.replace(cfg, data=4, fsdp=2, tensor=2), 8)
