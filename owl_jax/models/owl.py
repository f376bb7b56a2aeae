"""mPLUG-Owl: vision tower -> visual abstractor -> visual tokens spliced at `<image>` slots -> LLaMA.

The composite keeps the official checkpoint's top-level names (`vision_model`, `abstractor`,
`language_model`), so parameter paths read like the released weights and LoRA target patterns written
for the official layout (e.g. `language_model.*q_proj`) match here too. The learned queries live in the
abstractor (`abstractor.query_tokens`), where they are used.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from owl_jax.config import ModelConfig
from owl_jax.loss import token_nll
from owl_jax.models.abstractor import VisualAbstractor
from owl_jax.models.layers import apply_lora
from owl_jax.models.llama import LlamaModel
from owl_jax.models.splice import splice
from owl_jax.models.vision import VisionTower


class MplugOwl(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.tokens_per_image = cfg.tokens_per_image
        self.loss_chunk_size = cfg.loss_chunk_size
        self.vision_model = VisionTower(cfg, rngs=rngs)
        self.abstractor = VisualAbstractor(cfg, rngs=rngs)
        self.language_model = LlamaModel(cfg, rngs=rngs)

    def encode_images(self, pixel_values: jax.Array) -> jax.Array:
        """[N, H, W, C] normalised pixels -> [N, tokens_per_image, D_llm] visual tokens."""
        return self.abstractor(self.vision_model(pixel_values))

    def embed_inputs(self, tokens: jax.Array, pixel_values: Optional[jax.Array] = None,
                     image_index: Optional[jax.Array] = None) -> jax.Array:
        """Token embeddings with visual tokens spliced in. Placeholder ids (negative) embed as id 0
        before being replaced, so they never index out of range."""
        embeds = self.language_model.embed(jnp.maximum(tokens, 0))
        if pixel_values is None:
            return embeds
        if image_index is None:
            raise ValueError("pixel_values given without image_index (see models.splice.plan_image_slots)")
        return splice(embeds, self.encode_images(pixel_values), image_index)

    def __call__(self, tokens: jax.Array, *, positions: Optional[jax.Array] = None,
                 segment_ids: Optional[jax.Array] = None, pixel_values: Optional[jax.Array] = None,
                 image_index: Optional[jax.Array] = None) -> jax.Array:
        """Final-normed LLM hidden states [B, T, D]."""
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        embeds = self.embed_inputs(tokens, pixel_values, image_index)
        return self.language_model(embeds, positions, segment_ids)

    def logits(self, tokens: jax.Array, **kwargs) -> jax.Array:
        return self.language_model.logits(self(tokens, **kwargs))

    def loss_terms(self, batch: dict) -> tuple[jax.Array, jax.Array]:
        """(sum of masked token NLLs, number of loss tokens) of a batch dict with `tokens`, `targets`,
        `loss_mask` and optionally `positions`, `segment_ids`, `pixel_values`, `image_index`. Sums (not
        means) so that micro-batches accumulate into exactly the large-batch token mean."""
        hidden = self(batch["tokens"], positions=batch.get("positions"), segment_ids=batch.get("segment_ids"),
                      pixel_values=batch.get("pixel_values"), image_index=batch.get("image_index"))
        nll = token_nll(hidden, self.language_model.output_kernel(), batch["targets"],
                        chunk_size=self.loss_chunk_size)
        mask = batch["loss_mask"].astype(jnp.float32)
        return jnp.sum(jnp.where(mask > 0, nll, 0.0)), mask.sum()

    def loss(self, batch: dict) -> tuple[jax.Array, dict]:
        """Masked token-mean cross-entropy; 0 (not NaN) when no token is counted."""
        total, count = self.loss_terms(batch)
        loss = total / jnp.maximum(count, 1.0)
        return loss, {"loss": loss, "tokens": count}


def build_model(cfg: ModelConfig, *, seed: int = 0) -> MplugOwl:
    """Create the model (with LoRA adapters when `cfg.lora.rank > 0`).

    Built without eager sharding: parameters carry logical axis names as metadata and are placed on a
    mesh by `owl_jax.sharding`, not at construction. Works under `nnx.eval_shape` for abstract builds.
    """
    # Eager on purpose: each op compiles once per shape and is cached for the process, so repeated
    # builds are fast; full-size models are created abstractly or by a sharded jitted initialiser.
    with nnx.use_eager_sharding(False):
        rngs = nnx.Rngs(params=seed, dropout=seed + 1)
        model = MplugOwl(cfg, rngs=rngs)
        if cfg.lora.rank > 0:
            apply_lora(model, targets=cfg.lora.targets, rank=cfg.lora.rank, alpha=cfg.lora.alpha,
                       dropout=cfg.lora.dropout, rngs=rngs)
    return model
