"""LLaMA decoder with Hugging Face `LlamaForCausalLM` semantics.

Covers what current LLaMA checkpoints need: grouped-query attention, `rope_theta`, llama3 / linear
`rope_scaling`, tied embeddings. RoPE uses HF's rotate-half layout (first half / second half of each
head), so HF q/k weights load without permutation. Packed rows are supported through segment ids
(block-diagonal causal attention) and per-token positions that restart in each segment.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from owl_jax.config import ModelConfig, TextConfig
from owl_jax.models.layers import Dense, LayerStack, RMSNorm, attention, dtype_of, normal_init


def rope_inv_freq(cfg: TextConfig) -> np.ndarray:
    """Inverse frequencies of the rotary embedding, with llama3/linear scaling as HF computes them."""
    dim = cfg.dim_per_head
    # HF (torch) computes theta ** (arange / dim) in float32. numpy's float32 `**` is not correctly rounded
    # and its result changes with the numpy build (2.4's SIMD power is 2 ulp off torch's on the golden
    # model): the power is taken in float64 and rounded to float32 once, then inverted in float32, which
    # matches torch's float32 values bit for bit at the golden sizes whatever numpy does.
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = np.float32(1.0) / (cfg.rope_theta ** exponents.astype(np.float64)).astype(np.float32)
    scaling = cfg.rope_scaling
    if scaling.type == "linear":
        return (inv_freq / scaling.factor).astype(np.float32)
    if scaling.type == "llama3":
        low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
        high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
        smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor)
        smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    return inv_freq


def rope_tables(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """cos/sin of shape [B, T, head_dim] for integer positions [B, T] (float32)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)[None, None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """HF rotate-half RoPE on [B, T, N, H]; computed in float32, cast back."""
    dtype = x.dtype
    x = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x * cos[:, :, None, :] + rotated * sin[:, :, None, :]).astype(dtype)


class LlamaAttention(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, param_dtype, attention_impl: str, rngs: nnx.Rngs):
        d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.kv_heads, cfg.dim_per_head
        self.num_heads, self.num_kv_heads, self.head_dim = n, k, h
        self.attention_impl = attention_impl
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = Dense(d, n * h, axes=("embed", "heads"), **kw)
        self.k_proj = Dense(d, k * h, axes=("embed", "kv_heads"), **kw)
        self.v_proj = Dense(d, k * h, axes=("embed", "kv_heads"), **kw)
        self.o_proj = Dense(n * h, d, axes=("heads", "embed"), **kw)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
        b, t, _ = x.shape
        q = apply_rope(self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim), cos, sin)
        k = apply_rope(self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        out = attention(q, k, v, causal=True, q_segment_ids=segment_ids, implementation=self.attention_impl)
        return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim))


class LlamaMLP(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = Dense(d, f, axes=("embed", "mlp"), **kw)
        self.up_proj = Dense(d, f, axes=("embed", "mlp"), **kw)
        self.down_proj = Dense(f, d, axes=("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, param_dtype, attention_impl: str, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.self_attn = LlamaAttention(cfg, dtype=dtype, param_dtype=param_dtype,
                                        attention_impl=attention_impl, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.mlp = LlamaMLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, cos, sin, segment_ids):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, segment_ids)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nnx.Module):
    """Embeddings, decoder layers, final norm and the vocabulary projection (`lm_head`)."""

    def __init__(self, model_cfg: ModelConfig, *, rngs: nnx.Rngs):
        cfg = model_cfg.text
        dtype, param_dtype = dtype_of(model_cfg.dtype), dtype_of(model_cfg.param_dtype)
        self.dtype = dtype
        # A tuple (hashable, static): modules must not hold raw arrays outside Variables.
        self.inv_freq = tuple(float(f) for f in rope_inv_freq(cfg))
        self.embed_tokens = nnx.Param(normal_init(0.02)(rngs.params(), (cfg.vocab_size, cfg.hidden_size), param_dtype),
                                      out_sharding=("vocab", "embed"))
        self.layers = LayerStack(
            lambda r: LlamaLayer(cfg, dtype=dtype, param_dtype=param_dtype,
                                 attention_impl=model_cfg.attention_impl, rngs=r),
            cfg.num_layers, rngs=rngs, scan=model_cfg.scan_layers, remat_policy=model_cfg.remat_policy)
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.lm_head = None if cfg.tie_word_embeddings else Dense(
            cfg.hidden_size, cfg.vocab_size, axes=("embed", "vocab"), use_bias=False, dtype=dtype,
            param_dtype=param_dtype, rngs=rngs)

    def embed(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.embed_tokens[...], tokens, axis=0).astype(self.dtype)

    def output_kernel(self) -> jax.Array:
        """(D, V) matrix of the vocabulary projection (the transposed embedding when tied), with a LoRA
        adapter on `lm_head` folded in (its dropout does not apply on this path)."""
        if self.lm_head is None:
            return self.embed_tokens[...].T
        kernel = self.lm_head.kernel[...]
        if self.lm_head.lora is not None:
            kernel = (kernel.astype(jnp.float32) + self.lm_head.lora.delta()).astype(kernel.dtype)
        return kernel

    def _rope(self, positions: jax.Array):
        return rope_tables(positions, self.inv_freq)

    def __call__(self, embeds: jax.Array, positions: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        """Input embeddings [B, T, D] -> final-normed hidden states [B, T, D]."""
        cos, sin = self._rope(positions)
        x = self.layers(embeds.astype(self.dtype), cos, sin, segment_ids)
        return self.norm(x)

    def hidden_states(self, embeds, positions, segment_ids=None) -> list[jax.Array]:
        """HF-style hidden_states: the embeddings, each layer's output, and the final-normed last one."""
        cos, sin = self._rope(positions)
        x = embeds.astype(self.dtype)
        last, outs = self.layers.collect(x, cos, sin, segment_ids)
        return [x] + outs[:-1] + [self.norm(last)]

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Full logits in float32 (generation / evaluation; training uses the chunked loss instead)."""
        kernel = self.output_kernel().astype(self.dtype)
        return jnp.dot(hidden.astype(self.dtype), kernel, preferred_element_type=jnp.float32)
