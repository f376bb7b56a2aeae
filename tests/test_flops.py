"""Analytic step FLOPs (owl_jax.flops) against what XLA compiles, per stage: frozen weights must cost no
weight-gradient matmuls (in `pretrain` the LLM would add ~50% if they did)."""

import jax
import pytest

from owl_jax.config import load_config
from owl_jax.flops import compiled_flops, step_flops
from owl_jax.sharding import make_mesh
from owl_jax.training.train_step import abstract_train_state, make_step_function
from test_training import make_batch

# Widths large enough that matmuls dominate elementwise work; unrolled layers and an unchunked loss so
# that XLA's cost analysis (which counts a loop body once) sees every matmul.
SMALL = ["model.vision.hidden_size=256", "model.vision.intermediate_size=1024", "model.abstractor.hidden_size=256",
         "model.abstractor.intermediate_size=512", "model.text.hidden_size=512", "model.text.intermediate_size=1024",
         "model.text.vocab_size=2048", "model.loss_chunk_size=0", "model.scan_layers=false", "model.lora.rank=4",
         "mesh.fsdp=1"]
ROWS, SEQ = 8, 128


@pytest.mark.parametrize("stage", ["pretrain", "instruct_lora", "instruct_full", "lm_pretrain"])
def test_compiled_step_flops_match_the_analytic_count(stage):
    cfg = load_config("configs/tiny_test.yaml", [*SMALL, f"training.stage={stage}"])
    batch, _ = make_batch(cfg, rows=ROWS, seq=SEQ)
    graphdef, abstract_state, _, schedule, _ = abstract_train_state(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))
    step = make_step_function(graphdef, cfg, schedule)
    abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
    compiled = jax.jit(step).lower(abstract_state, abstract_batch).compile()
    images = len(batch["pixel_values"]) if "pixel_values" in batch else 0
    analytic = step_flops(cfg.model, stage, tokens=ROWS * SEQ, seq_len=SEQ, images=images, causal_halving=False)
    ratio = compiled_flops(compiled) / analytic.total
    assert 0.97 < ratio < 1.05, f"{stage}: compiled/analytic = {ratio:.4f} ({analytic})"


# Trainable sets beyond the first release's stages: presets of both families and config patterns (a
# middle tower layer and one LLM MLP: forward-only below them, input gradients above).
@pytest.mark.parametrize("family, overrides", [
    ("owl", ["training.stage=owl_stage2_paper"]),
    ("llava", ["training.stage=llava_stage2"]),
    ("llava", ["training.stage=llava_lora", "model.lora.targets=['language_model\\..*_proj$']"]),
    ("owl", [r"training.trainable=['^vision_model\.layers\.1\.', '^language_model\.layers\.1\.mlp\.']"]),
], ids=["owl_stage2_paper", "llava_stage2", "llava_lora", "patterns"])
def test_compiled_flops_follow_the_configured_trainable_set(family, overrides):
    from helpers import image_train_batch
    from test_trainable import TINY_LLAVA
    cfg = load_config("configs/tiny_test.yaml", [*SMALL, *(TINY_LLAVA if family == "llava" else []), *overrides])
    if family == "llava":
        batch = image_train_batch(cfg, rows=ROWS, seq=SEQ, images=(1, 2, 0, 1, 1, 0, 2, 1), budget=8)
    else:
        batch, _ = make_batch(cfg, rows=ROWS, seq=SEQ)
    graphdef, abstract_state, _, schedule, _ = abstract_train_state(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))
    step = make_step_function(graphdef, cfg, schedule)
    abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
    compiled = jax.jit(step).lower(abstract_state, abstract_batch).compile()
    analytic = step_flops(cfg.model, cfg.training, tokens=ROWS * SEQ, seq_len=SEQ, images=len(batch["pixel_values"]),
                          causal_halving=False)
    ratio = compiled_flops(compiled) / analytic.total
    assert 0.97 < ratio < 1.05, f"{overrides}: compiled/analytic = {ratio:.4f} ({analytic})"


def test_the_count_reads_the_trainable_set_not_the_stage_name():
    """The same leaves give the same count whether a preset or `training.trainable` names them; other
    leaves under the same stage name give another count."""
    from owl_jax.training.stages import trainable_patterns
    cfg = load_config("configs/tiny_test.yaml", [*SMALL, "training.stage=owl_stage2_paper"])
    same = load_config("configs/tiny_test.yaml", [*SMALL, "training.stage=owl_stage2_paper",
                                                  "training.trainable=[" + ", ".join(
                                                      f"'{p}'" for p in trainable_patterns(cfg.training)[0]) + "]"])
    other = load_config("configs/tiny_test.yaml", [*SMALL, "training.stage=owl_stage2_paper",
                                                   r"training.trainable=['^language_model\.layers\.1\.']"])
    kw = dict(tokens=ROWS * SEQ, seq_len=SEQ, images=8)
    preset = step_flops(cfg.model, cfg.training, **kw)
    assert step_flops(cfg.model, same.training, **kw) == preset == step_flops(cfg.model, "owl_stage2_paper", **kw)
    # only the last LLM layer trains: the tower and abstractor run forward only, and so does layer 0
    partial = step_flops(cfg.model, other.training, **kw)
    frozen_vision = step_flops(cfg.model, "instruct_lora", **kw).vision
    assert partial.vision == frozen_vision and partial.llm < preset.llm


@pytest.mark.parametrize("kind, peak", [("TPU v4", 275e12), ("TPU v5", 459e12), ("TPU v5 lite", 197e12),
                                        ("TPU v6 lite", 918e12), ("NVIDIA H100 80GB HBM3", 989e12),
                                        ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989e12),
                                        ("NVIDIA A100-SXM4-80GB", 312e12)])
def test_known_chips_have_their_peak(kind, peak):
    from owl_jax.chips import chip_spec, mfu
    assert chip_spec(kind).peak_bf16_flops == peak
    assert mfu(peak * 8 * 0.4, kind, 8) == pytest.approx(0.4)


@pytest.mark.parametrize("kind", ["cpu", "NVIDIA GeForce RTX 4090", "TPU v7x"])
def test_unknown_chips_report_no_mfu(kind):
    from owl_jax.chips import mfu
    assert mfu(1e12, kind, 1) is None


def test_tpu_topologies_use_the_chip_table():
    from owl_jax import aot, chips
    assert aot.CHIPS["v5e"].peak_bf16_flops == chips.TPU_V5E.peak_bf16_flops
    assert aot.CHIPS["v6e"].hbm_bytes == chips.TPU_V6E.hbm_bytes
