"""The visual abstractor: learned queries cross-attend to [queries ; image features] (DESIGN.md §2).

Per layer, with `x` the queries and `img` the vision output:
    qn = norm1(x); kn = normk(img); kv = [qn ; kn]
    x  = qn + out_proj(attn(query(qn), key(kv), value(kv)))      # residual from the *normed* queries
    x  = x + w2(ffn_ln(silu(w1(norm2(x))) * w3(norm2(x))))
then `visual_fc` to the LLM width and a learned `vit_eos` token appended. The residual from the normed
queries and the two different LayerNorm epsilons are the official code's behaviour and are kept
deliberately: released checkpoints depend on them.

As a connector (`owl_jax.models.connectors`) it reads the post-LayerNormed last vision layer with CLS and
lives at `abstractor.*` in the composite, as in the official checkpoints.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from owl_jax.config import AbstractorConfig, ModelConfig
from owl_jax.models.connectors import FeatureDefaults
from owl_jax.models.layers import Dense, LayerNorm, LayerStack, attention, dtype_of, normal_init

ATTRIBUTE = "abstractor"
DEFAULTS = FeatureDefaults(layers=(-1,), strategy="full", post_layernorm=True)
TRAINED_WITH_VISION = True  # mPLUG-Owl stage 1 trains the tower and the abstractor


class AbstractorAttention(nnx.Module):
    """Multi-head attention of the queries over [queries ; image]; dropout on the attention
    probabilities in training (so the training path computes softmax explicitly; the abstractor's
    64 x (64 + 257) score matrix is small)."""

    def __init__(self, cfg: AbstractorConfig, *, dtype, param_dtype, attention_impl: str, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.attention_impl = attention_impl
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.query = Dense(d, d, axes=("vision_embed", "heads"), **kw)
        self.key = Dense(d, d, axes=("vision_embed", "heads"), **kw)
        self.value = Dense(d, d, axes=("vision_embed", "heads"), **kw)
        self.dropout = nnx.Dropout(cfg.attention_dropout, rngs=rngs)

    def __call__(self, x: jax.Array, kv: jax.Array) -> jax.Array:
        b, q_len, d = x.shape
        h = self.num_heads
        q = self.query(x).reshape(b, q_len, h, d // h)
        k = self.key(kv).reshape(b, kv.shape[1], h, d // h)
        v = self.value(kv).reshape(b, kv.shape[1], h, d // h)
        drop = None if self.dropout.deterministic or self.dropout.rate == 0 else self.dropout
        out = attention(q, k, v, dropout=drop, implementation=self.attention_impl if drop is None else "xla")
        return out.reshape(b, q_len, d)


class AbstractorMLP(nnx.Module):
    """SwiGLU with a LayerNorm before the down projection (`ffn_ln`)."""

    def __init__(self, cfg: AbstractorConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.w1 = Dense(d, f, axes=("vision_embed", "mlp"), **kw)
        self.w3 = Dense(d, f, axes=("vision_embed", "mlp"), **kw)
        self.ffn_ln = LayerNorm(f, eps=cfg.layer_norm_eps, param_dtype=param_dtype)
        self.w2 = Dense(f, d, axes=("mlp", "vision_embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.w2(self.ffn_ln(jax.nn.silu(self.w1(x)) * self.w3(x)))


class AbstractorLayer(nnx.Module):
    def __init__(self, cfg: AbstractorConfig, *, dtype, param_dtype, attention_impl: str, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.norm1 = LayerNorm(d, eps=cfg.norm_eps, param_dtype=param_dtype)
        self.normk = LayerNorm(d, eps=cfg.norm_eps, param_dtype=param_dtype)
        self.attention = AbstractorAttention(cfg, dtype=dtype, param_dtype=param_dtype,
                                             attention_impl=attention_impl, rngs=rngs)
        self.out_proj = Dense(d, d, axes=("heads", "vision_embed"), use_bias=True, dtype=dtype,
                              param_dtype=param_dtype, rngs=rngs)
        self.norm2 = LayerNorm(d, eps=cfg.norm_eps, param_dtype=param_dtype)
        self.mlp = AbstractorMLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, image: jax.Array) -> jax.Array:
        qn = self.norm1(x)
        kv = jnp.concatenate([qn, self.normk(image)], axis=1)
        x = qn + self.out_proj(self.attention(qn, kv))
        return x + self.mlp(self.norm2(x))


class VisualAbstractor(nnx.Module):
    """[N, P, Dv] vision features -> [N, num_queries + 1, D_llm] visual tokens."""

    def __init__(self, model_cfg: ModelConfig, *, rngs: nnx.Rngs):
        cfg = model_cfg.abstractor
        dtype, param_dtype = dtype_of(model_cfg.dtype), dtype_of(model_cfg.param_dtype)
        self.dtype = dtype
        d, d_llm = cfg.hidden_size, model_cfg.text.hidden_size
        # Official code initialises the queries at zero; a small normal init lets them differ from the
        # start (the choice only matters when training from scratch; checkpoints overwrite it).
        self.query_tokens = nnx.Param(normal_init(cfg.query_init_std)(rngs.params(), (cfg.num_queries, d),
                                                                      param_dtype),
                                      out_sharding=("queries", "vision_embed"))
        self.layers = LayerStack(
            lambda r: AbstractorLayer(cfg, dtype=dtype, param_dtype=param_dtype,
                                      attention_impl=model_cfg.attention_impl, rngs=r),
            cfg.num_layers, rngs=rngs, scan=model_cfg.scan_layers, remat_policy=model_cfg.remat_policy)
        self.visual_fc = Dense(d, d_llm, axes=("vision_embed", "embed"), use_bias=True, dtype=dtype,
                               param_dtype=param_dtype, rngs=rngs)
        self.vit_eos = nnx.Param(normal_init(0.02)(rngs.params(), (d_llm,), param_dtype),
                                 out_sharding=("embed",))

    def queries(self, n: int) -> jax.Array:
        return jnp.broadcast_to(self.query_tokens[...].astype(self.dtype), (n,) + self.query_tokens.shape)

    def project(self, x: jax.Array) -> jax.Array:
        """visual_fc of the abstracted queries, then the `vit_eos` token appended."""
        x = self.visual_fc(x)
        eos = jnp.broadcast_to(self.vit_eos[...].astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
        return jnp.concatenate([x, eos], axis=1)

    def __call__(self, image: jax.Array) -> jax.Array:
        image = image.astype(self.dtype)
        return self.project(self.layers(self.queries(image.shape[0]), image))

    def layer_outputs(self, image: jax.Array) -> list[jax.Array]:
        image = image.astype(self.dtype)
        _, outs = self.layers.collect(self.queries(image.shape[0]), image)
        return outs


# ---- connector interface (see owl_jax.models.connectors) -------------------------------------------------


def build(cfg: ModelConfig, feature_dim: int, *, rngs: nnx.Rngs) -> VisualAbstractor:
    return VisualAbstractor(cfg, rngs=rngs)


def tokens_per_image(cfg: ModelConfig, num_features: int) -> int:
    """The abstracted queries plus the learned `vit_eos`, whatever the number of vision tokens."""
    return cfg.abstractor.num_queries + 1


def problems(cfg: ModelConfig, feature_dim: int) -> list[str]:
    a = cfg.abstractor
    if a.hidden_size != feature_dim:
        return [f"model.abstractor.hidden_size ({a.hidden_size}) must equal model.vision.hidden_size "
                f"({cfg.vision.hidden_size}) times the number of model.vision_feature_layer entries "
                f"(feature width {feature_dim}): the abstractor concatenates its queries with the image "
                f"features for keys/values"]
    return []


def forward_flops(cfg: ModelConfig, num_features: int) -> tuple[float, float]:
    """(linear incl. visual_fc, attention) forward FLOPs per image."""
    a = cfg.abstractor
    q, kv, d, f = a.num_queries, a.num_queries + num_features, a.hidden_size, a.intermediate_size
    linear = a.num_layers * 2.0 * (q * d * d + 2 * kv * d * d + q * d * d + 3 * q * d * f)
    attention_flops = a.num_layers * 4.0 * q * kv * d
    return linear + 2.0 * q * d * cfg.text.hidden_size, attention_flops


def step_flops(cfg: ModelConfig, num_features: int, feature_dim: int, *, trained_parts: frozenset[str],
               input_grad: bool) -> float:
    """Trained: every matmul x3 (its queries are trained, so input gradients are needed throughout);
    frozen: x1, or x2 (attention x3) when gradients pass through to a trained tower."""
    trained = bool(trained_parts)  # counted as a unit
    linear, attn = forward_flops(cfg, num_features)
    if trained:
        return 3 * (linear + attn)
    return 2 * linear + 3 * attn if input_grad else linear + attn
