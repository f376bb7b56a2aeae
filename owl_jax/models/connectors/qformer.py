"""BLIP-2's Q-Former and its projection into the LLM (transformers `Blip2QFormerModel` /
`InstructBlipQFormerModel` + `language_projection`; DESIGN.md §6).

Per image, with `x` the 32 learned queries (InstructBLIP: the queries followed by the instruction's tokens,
embedded with the Q-Former's own word and position embeddings) and `img` the vision features:

    x = dropout(layernorm(x))
    per layer l (BERT, post-LayerNorm):
        x = LN(x + dropout(dense(self_attention(x))))            # queries and text attend to each other
        q = x[:, :Q]
        if l % cross_attention_frequency == 0:
            q = LN(q + dropout(dense(cross_attention(q, img))))  # queries only
        q = LN(q + dropout(output_query(gelu(intermediate_query(q)))))
        t = LN(t + dropout(output(gelu(intermediate(x[:, Q:])))))   # InstructBLIP's text path
        x = [q ; t]
    visual tokens = language_projection(x[:, :Q])

Padding instruction tokens (id < 0) are masked out as keys; the text's positions are 0..L-1 as transformers
gives them. Layers are stacked in blocks of `cross_attention_frequency` (the first of each block
cross-attends), so that a scanned stack has one body; checkpoint layer `b * frequency + j` is block b's layer j.

Batch contract (InstructBLIP): `qformer_tokens` [images, L] int32, row i the instruction of image slot i
(the rows of `pixel_values`), padded with -1. Image slots without a picture may hold anything; their visual
tokens are never spliced. Without `qformer_tokens` the Q-Former runs on the queries alone (BLIP-2).

As a connector (`owl_jax.models.connectors`) it reads the post-LayerNormed last vision layer with CLS
(what `Blip2VisionModel` gives as `last_hidden_state`), lives at `qformer.*` in the composite (with its
`query_tokens` and `language_projection`) and is trained alone in stage `pretrain` (the tower stays frozen:
BLIP-2's Q-Former stages, InstructBLIP).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from owl_jax.config import ModelConfig, QFormerConfig
from owl_jax.models.connectors import FeatureDefaults
from owl_jax.models.layers import Dense, LayerNorm, LayerStack, attention, dtype_of, normal_init

ATTRIBUTE = "qformer"
DEFAULTS = FeatureDefaults(layers=(-1,), strategy="full", post_layernorm=True)
TRAINED_WITH_VISION = False  # BLIP-2 / InstructBLIP / MiniGPT-4 keep the ViT frozen


def _activation(name: str):
    from owl_jax.models.vision import ACTIVATIONS
    return ACTIVATIONS[name]


class QFormerAttention(nnx.Module):
    """BERT attention + its output sub-layer: `LN(x + dropout(output(attn(query(x), key(kv), value(kv)))))`.
    `kv_width` is the hidden size (self-attention) or the vision feature width (cross-attention)."""

    def __init__(self, cfg: QFormerConfig, kv_width: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.num_heads = cfg.num_heads
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.query = Dense(d, d, axes=("vision_embed", "heads"), **kw)
        self.key = Dense(kv_width, d, axes=("vision_embed", "heads"), **kw)
        self.value = Dense(kv_width, d, axes=("vision_embed", "heads"), **kw)
        self.output = Dense(d, d, axes=("heads", "vision_embed"), **kw)
        self.norm = LayerNorm(d, eps=cfg.layer_norm_eps, param_dtype=param_dtype)
        self.attention_dropout = nnx.Dropout(cfg.attention_dropout, rngs=rngs)
        self.dropout = nnx.Dropout(cfg.hidden_dropout, rngs=rngs)

    def __call__(self, x: jax.Array, kv: jax.Array, kv_mask: jax.Array | None) -> jax.Array:
        b, t, d = x.shape
        h = self.num_heads
        q = self.query(x).reshape(b, t, h, d // h)
        k = self.key(kv).reshape(b, kv.shape[1], h, d // h)
        v = self.value(kv).reshape(b, kv.shape[1], h, d // h)
        mask = None if kv_mask is None else kv_mask[:, None, None, :]
        drop = None if self.attention_dropout.deterministic or self.attention_dropout.rate == 0 \
            else self.attention_dropout  # on the probabilities, as BERT does
        out = attention(q, k, v, mask=mask, dropout=drop)
        return self.norm(x + self.dropout(self.output(out.reshape(b, t, d))))


class QFormerFeedForward(nnx.Module):
    """BERT feed-forward sub-layer: `LN(x + dropout(output(act(intermediate(x)))))`."""

    def __init__(self, cfg: QFormerConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.intermediate = Dense(d, f, axes=("vision_embed", "mlp"), **kw)
        self.output = Dense(f, d, axes=("mlp", "vision_embed"), **kw)
        self.norm = LayerNorm(d, eps=cfg.layer_norm_eps, param_dtype=param_dtype)
        self.dropout = nnx.Dropout(cfg.hidden_dropout, rngs=rngs)
        self.hidden_act = cfg.hidden_act

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.norm(x + self.dropout(self.output(_activation(self.hidden_act)(self.intermediate(x)))))


class QFormerLayer(nnx.Module):
    """One BERT layer of the Q-Former (transformers `Blip2QFormerLayer`)."""

    def __init__(self, cfg: QFormerConfig, encoder_width: int, *, cross: bool, num_queries: int, dtype,
                 param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.num_queries = num_queries
        self.attention = QFormerAttention(cfg, cfg.hidden_size, **kw)
        self.crossattention = QFormerAttention(cfg, encoder_width, **kw) if cross else None
        self.query_ffn = QFormerFeedForward(cfg, **kw)
        self.text_ffn = QFormerFeedForward(cfg, **kw) if cfg.text_input else None

    def __call__(self, x: jax.Array, image: jax.Array, mask: jax.Array | None) -> jax.Array:
        x = self.attention(x, x, mask)
        q = x[:, :self.num_queries]
        if self.crossattention is not None:
            q = self.crossattention(q, image, None)
        q = self.query_ffn(q)
        if x.shape[1] == self.num_queries:
            return q
        # the text path (InstructBLIP); in the last layer its output is unused and XLA drops it
        return jnp.concatenate([q, self.text_ffn(x[:, self.num_queries:])], axis=1)


class QFormerBlock(nnx.Module):
    """`cross_attention_frequency` consecutive layers, the first with cross-attention (`layer_0`, ...)."""

    def __init__(self, cfg: QFormerConfig, encoder_width: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.size = cfg.cross_attention_frequency
        for j in range(self.size):
            setattr(self, f"layer_{j}", QFormerLayer(cfg, encoder_width, cross=j == 0, num_queries=cfg.num_queries,
                                                     dtype=dtype, param_dtype=param_dtype, rngs=rngs))

    def __call__(self, x: jax.Array, image: jax.Array, mask: jax.Array | None) -> jax.Array:
        for j in range(self.size):
            x = getattr(self, f"layer_{j}")(x, image, mask)
        return x


class QFormer(nnx.Module):
    """[N, P, D_features] vision features (+ [N, L] instruction ids) -> [N, num_queries, D_llm] visual tokens."""

    reads_text = True  # the composite passes `qformer_tokens` to this connector only

    def __init__(self, model_cfg: ModelConfig, feature_dim: int, *, rngs: nnx.Rngs):
        cfg = model_cfg.qformer
        dtype, param_dtype = dtype_of(model_cfg.dtype), dtype_of(model_cfg.param_dtype)
        self.dtype = dtype
        self.text_input = cfg.text_input
        self.max_text_len = cfg.max_text_len  # instruction ids per image a caller pads to (generation)
        self.num_queries = cfg.num_queries
        d = cfg.hidden_size
        self.query_tokens = nnx.Param(normal_init(cfg.query_init_std)(rngs.params(), (cfg.num_queries, d),
                                                                      param_dtype),
                                      out_sharding=("queries", "vision_embed"))
        if cfg.text_input:
            self.word_embeddings = nnx.Param(normal_init(0.02)(rngs.params(), (cfg.vocab_size, d), param_dtype),
                                             out_sharding=("vocab", "vision_embed"))
            self.position_embeddings = nnx.Param(
                normal_init(0.02)(rngs.params(), (cfg.max_position_embeddings, d), param_dtype),
                out_sharding=("positions", "vision_embed"))
        self.layernorm = LayerNorm(d, eps=cfg.layer_norm_eps, param_dtype=param_dtype)
        self.dropout = nnx.Dropout(cfg.hidden_dropout, rngs=rngs)
        self.layers = LayerStack(
            lambda r: QFormerBlock(cfg, feature_dim, dtype=dtype, param_dtype=param_dtype, rngs=r),
            cfg.num_layers // cfg.cross_attention_frequency, rngs=rngs, scan=model_cfg.scan_layers,
            remat_policy=model_cfg.remat_policy)
        self.language_projection = Dense(d, model_cfg.text.hidden_size, axes=("vision_embed", "embed"),
                                         use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def embed(self, n: int, text_tokens: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
        """(the layer input [N, Q (+ L), D] after `layernorm` and dropout, the key mask or None)."""
        x = jnp.broadcast_to(self.query_tokens[...].astype(self.dtype), (n, *self.query_tokens.shape))
        mask = None
        if text_tokens is not None:
            if not self.text_input:
                raise ValueError("qformer_tokens given, but this Q-Former reads no text (model.qformer.text_input "
                                 "is false: BLIP-2; InstructBLIP sets it)")
            if text_tokens.shape[0] != n:
                raise ValueError(f"qformer_tokens has {text_tokens.shape[0]} rows for {n} image slots")
            length = text_tokens.shape[1]
            if length > self.position_embeddings.shape[0]:
                raise ValueError(f"qformer_tokens of length {length} exceed the Q-Former's "
                                 f"{self.position_embeddings.shape[0]} positions")
            text = (self.word_embeddings[...][jnp.maximum(text_tokens, 0)]
                    + self.position_embeddings[...][:length][None]).astype(self.dtype)
            x = jnp.concatenate([x, text], axis=1)
            mask = jnp.concatenate([jnp.ones((n, self.num_queries), bool), text_tokens >= 0], axis=1)
        return self.dropout(self.layernorm(x)), mask

    def encode(self, features: jax.Array, text_tokens: jax.Array | None = None) -> jax.Array:
        """The Q-Former's query outputs [N, Q, D_qformer] (transformers' `last_hidden_state[:, :Q]`)."""
        x, mask = self.embed(features.shape[0], text_tokens)
        x = self.layers(x, features.astype(self.dtype), mask)
        return x[:, :self.num_queries]

    def __call__(self, features: jax.Array, text_tokens: jax.Array | None = None) -> jax.Array:
        return self.language_projection(self.encode(features, text_tokens))


# ---- connector interface (see owl_jax.models.connectors) -------------------------------------------------


def build(cfg: ModelConfig, feature_dim: int, *, rngs: nnx.Rngs) -> QFormer:
    return QFormer(cfg, feature_dim, rngs=rngs)


def tokens_per_image(cfg: ModelConfig, num_features: int) -> int:
    return cfg.qformer.num_queries


def problems(cfg: ModelConfig, feature_dim: int) -> list[str]:
    q = cfg.qformer
    p = [f"model.qformer.{name} must be >= 1, got {getattr(q, name)}"
         for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "num_queries",
                      "cross_attention_frequency", "max_position_embeddings", "vocab_size")
         if getattr(q, name) < 1]
    if p:
        return p
    if q.hidden_size % q.num_heads:
        p.append(f"model.qformer.hidden_size ({q.hidden_size}) must be divisible by num_heads ({q.num_heads})")
    if q.num_layers % q.cross_attention_frequency:
        p.append(f"model.qformer.num_layers ({q.num_layers}) must be a multiple of cross_attention_frequency "
                 f"({q.cross_attention_frequency}): owl-jax stacks the Q-Former in blocks that start with a "
                 f"cross-attention layer")
    if q.text_input and q.max_text_len > q.max_position_embeddings:
        p.append(f"model.qformer.max_text_len ({q.max_text_len}) exceeds max_position_embeddings "
                 f"({q.max_position_embeddings})")
    return p


def forward_flops(cfg: ModelConfig, num_features: int, feature_dim: int) -> tuple[float, float]:
    """(linear incl. language_projection, attention) forward FLOPs per image. Self-attention runs over the
    queries and, with `text_input`, `max_text_len` instruction tokens; the text feed-forward of the last layer
    is not counted (its output is unused, so XLA drops it)."""
    c = cfg.qformer
    q, d, f, n = c.num_queries, c.hidden_size, c.intermediate_size, c.num_layers
    text = c.max_text_len if c.text_input else 0
    s = q + text
    cross = n // c.cross_attention_frequency
    linear = n * 2.0 * s * 4 * d * d  # self-attention q/k/v and output
    linear += cross * 2.0 * (2 * q * d * d + 2 * num_features * feature_dim * d)  # cross q, output; image k/v
    linear += n * 2.0 * q * 2 * d * f + max(n - 1, 0) * 2.0 * text * 2 * d * f  # feed-forwards
    linear += 2.0 * q * d * cfg.text.hidden_size
    attention = n * 4.0 * s * s * d + cross * 4.0 * q * num_features * d
    return linear, attention


def step_flops(cfg: ModelConfig, num_features: int, feature_dim: int, *, trained_parts: frozenset[str],
               input_grad: bool) -> float:
    """Q-Former trained (any child but `language_projection`): every matmul x3 (its queries and text
    embeddings are trained, so input gradients are needed throughout) except the image key/value
    projections, which need no input gradient unless the tower trains. Q-Former frozen: x1, or x2 (attention
    x3) when gradients pass through to a trained tower; then `language_projection` alone trained (MiniGPT-4)
    is x2 (forward + weight gradient: nothing below it carries a gradient)."""
    linear, attn = forward_flops(cfg, num_features, feature_dim)
    c = cfg.qformer
    image_kv = (c.num_layers // c.cross_attention_frequency) * 2.0 * 2 * num_features * feature_dim * c.hidden_size
    if trained_parts - {"language_projection"}:
        return 3 * (linear + attn) - (0 if input_grad else image_kv)
    projection = 2.0 * c.num_queries * c.hidden_size * cfg.text.hidden_size  # its forward, inside `linear`
    body = linear - projection
    projection *= 1 + ("language_projection" in trained_parts) + input_grad
    return (2 * body + 3 * attn if input_grad else body + attn) + projection
