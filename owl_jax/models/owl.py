"""The composite: vision encoder -> connector -> visual tokens spliced at `<image>` slots -> LLaMA.

Parts, named as the checkpoints of each family name them so that parameter paths read like released
weights and LoRA / stage patterns match them: `vision_model` (CLIP or BLIP-2 ViT, `models/vision.py`), the
connector (`models/connectors/`: `abstractor` for mPLUG-Owl, with its learned queries at `abstractor.query_tokens`;
`projector` for LLaVA's linear / MLP projectors; `qformer` for BLIP-2 / InstructBLIP / MiniGPT-4, with
`qformer.query_tokens` and `qformer.language_projection`) and `language_model` (`models/llama.py`). Nothing here
depends on which connector it is: the connector decides its vision features and its tokens per image.

InstructBLIP's Q-Former also reads the instruction: the batch's optional `qformer_tokens` [images, L] (one
row per image slot, aligned with `pixel_values`, padded with -1; see `models/connectors/qformer.py`) goes to
the connector with the images; other connectors refuse it.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from owl_jax.config import ModelConfig
from owl_jax.loss import token_nll
from owl_jax.models.connectors import build_connector, connector_attribute
from owl_jax.models.layers import apply_lora
from owl_jax.models.llama import LlamaModel
from owl_jax.models.splice import splice
from owl_jax.models.vision import VisionTower


class MultimodalModel(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.tokens_per_image = cfg.tokens_per_image
        self.loss_chunk_size = cfg.loss_chunk_size
        self.connector_name = connector_attribute(cfg)
        self.vision_model = VisionTower(cfg, rngs=rngs)
        setattr(self, self.connector_name, build_connector(cfg, rngs=rngs))
        self.language_model = LlamaModel(cfg, rngs=rngs)

    @property
    def connector(self) -> nnx.Module:
        return getattr(self, self.connector_name)

    def encode_images(self, pixel_values: jax.Array, qformer_tokens: Optional[jax.Array] = None) -> jax.Array:
        """[N, H, W, C] normalised pixels (and, for a Q-Former reading text, [N, L] instruction ids) ->
        [N, tokens_per_image, D_llm] visual tokens."""
        features = self.vision_model(pixel_values)
        if qformer_tokens is None:
            return self.connector(features)
        if not getattr(self.connector, "reads_text", False):
            raise ValueError(f"qformer_tokens given, but the {self.connector_name} connector reads no text "
                             f"(only model.connector qformer with model.qformer.text_input does)")
        return self.connector(features, qformer_tokens)

    def embed_inputs(self, tokens: jax.Array, pixel_values: Optional[jax.Array] = None,
                     image_index: Optional[jax.Array] = None,
                     qformer_tokens: Optional[jax.Array] = None) -> jax.Array:
        """Token embeddings with visual tokens spliced in. Placeholder ids (negative) embed as id 0
        before being replaced, so they never index out of range."""
        embeds = self.language_model.embed(jnp.maximum(tokens, 0))
        if pixel_values is None:
            return embeds
        if image_index is None:
            raise ValueError("pixel_values given without image_index (see models.splice.plan_image_slots)")
        return splice(embeds, self.encode_images(pixel_values, qformer_tokens), image_index)

    def __call__(self, tokens: jax.Array, *, positions: Optional[jax.Array] = None,
                 segment_ids: Optional[jax.Array] = None, pixel_values: Optional[jax.Array] = None,
                 image_index: Optional[jax.Array] = None, qformer_tokens: Optional[jax.Array] = None) -> jax.Array:
        """Final-normed LLM hidden states [B, T, D]."""
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        embeds = self.embed_inputs(tokens, pixel_values, image_index, qformer_tokens)
        return self.language_model(embeds, positions, segment_ids)

    def logits(self, tokens: jax.Array, **kwargs) -> jax.Array:
        return self.language_model.logits(self(tokens, **kwargs))

    def loss_terms(self, batch: dict) -> tuple[jax.Array, jax.Array]:
        """(sum of masked token NLLs, number of loss tokens) of a batch dict with `tokens`, `targets`,
        `loss_mask` and optionally `positions`, `segment_ids`, `pixel_values`, `image_index`, `qformer_tokens`.
        Sums (not means) so that micro-batches accumulate into exactly the large-batch token mean."""
        hidden = self(batch["tokens"], positions=batch.get("positions"), segment_ids=batch.get("segment_ids"),
                      pixel_values=batch.get("pixel_values"), image_index=batch.get("image_index"),
                      qformer_tokens=batch.get("qformer_tokens"))
        nll = token_nll(hidden, self.language_model.output_kernel(), batch["targets"],
                        chunk_size=self.loss_chunk_size)
        mask = batch["loss_mask"].astype(jnp.float32)
        return jnp.sum(jnp.where(mask > 0, nll, 0.0)), mask.sum()

    def loss(self, batch: dict) -> tuple[jax.Array, dict]:
        """Masked token-mean cross-entropy; 0 (not NaN) when no token is counted."""
        total, count = self.loss_terms(batch)
        loss = total / jnp.maximum(count, 1.0)
        return loss, {"loss": loss, "tokens": count}


MplugOwl = MultimodalModel  # the name this class had before the composite took other connectors


def build_model(cfg: ModelConfig, *, seed: int = 0) -> MultimodalModel:
    """Create the model (with LoRA adapters when `cfg.lora.rank > 0`).

    Built without eager sharding: parameters carry logical axis names as metadata and are placed on a
    mesh by `owl_jax.sharding`, not at construction. Works under `nnx.eval_shape` for abstract builds.
    """
    # Eager on purpose: each op compiles once per shape and is cached for the process, so repeated
    # builds are fast; full-size models are created abstractly or by a sharded jitted initialiser.
    with nnx.use_eager_sharding(False):
        rngs = nnx.Rngs(params=seed, dropout=seed + 1)
        model = MultimodalModel(cfg, rngs=rngs)
        if cfg.lora.rank > 0:
            apply_lora(model, targets=cfg.lora.targets, rank=cfg.lora.rank, alpha=cfg.lora.alpha,
                       dropout=cfg.lora.dropout, rngs=rngs)
    return model
