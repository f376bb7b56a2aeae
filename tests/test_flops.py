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
