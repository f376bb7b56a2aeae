"""CLIP ViT vision tower with mPLUG-Owl's conventions (DESIGN.md §2).

Differences from Hugging Face `CLIPVisionModel` that matter for weights and numbers:
- one fused `query_key_value` projection whose 3·D outputs are laid out [heads, 3, head_dim];
- every LayerNorm uses eps 1e-6; the post-LayerNorm is applied to all tokens (CLS included), and that
  full sequence is what the abstractor consumes.
Images are NHWC float arrays already normalised with the CLIP mean/std.
"""

from __future__ import annotations

import jax
import numpy as np
import jax.numpy as jnp
from flax import nnx

from owl_jax.config import ModelConfig, VisionConfig
from owl_jax.models.layers import Dense, LayerNorm, LayerStack, attention, dtype_of, normal_init


def quick_gelu(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(1.702 * x)


class VisionAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, attention_impl: str, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.attention_impl = attention_impl
        self.query_key_value = Dense(d, 3 * d, axes=("vision_embed", "qkv"), use_bias=True, dtype=dtype,
                                     param_dtype=param_dtype, rngs=rngs)
        self.dense = Dense(d, d, axes=("qkv", "vision_embed"), use_bias=True, dtype=dtype,
                           param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        qkv = self.query_key_value(x).reshape(b, t, self.num_heads, 3, d // self.num_heads)
        q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]
        out = attention(q, k, v, implementation=self.attention_impl)
        return self.dense(out.reshape(b, t, d))


class VisionMLP(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.fc1 = Dense(cfg.hidden_size, cfg.intermediate_size, axes=("vision_embed", "mlp"), use_bias=True,
                         dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc2 = Dense(cfg.intermediate_size, cfg.hidden_size, axes=("mlp", "vision_embed"), use_bias=True,
                         dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(quick_gelu(self.fc1(x)))


class VisionLayer(nnx.Module):
    """Pre-norm transformer block: x + attn(ln(x)); x + mlp(ln(x))."""

    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, attention_impl: str, rngs: nnx.Rngs):
        self.input_layernorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, param_dtype=param_dtype)
        self.self_attn = VisionAttention(cfg, dtype=dtype, param_dtype=param_dtype,
                                         attention_impl=attention_impl, rngs=rngs)
        self.post_attention_layernorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps,
                                                  param_dtype=param_dtype)
        self.mlp = VisionMLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


def sincos2d_position_table(grid: int, dim: int, temperature: float = 10_000.0) -> np.ndarray:
    """[1 + grid², dim] float32: a zero row for CLS, then big_vision's `posemb_sincos_2d` over the patch
    grid in row-major order (dim/4 frequencies each of sin/cos of the x and of the y coordinate)."""
    if dim % 4:
        raise ValueError(f"sincos2d position embeddings need hidden_size divisible by 4, got {dim}")
    y, x = np.mgrid[:grid, :grid]
    omega = 1.0 / temperature ** (np.arange(dim // 4) / (dim // 4))
    y, x = y.reshape(-1, 1) * omega, x.reshape(-1, 1) * omega
    table = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
    return np.concatenate([np.zeros((1, dim)), table], axis=0).astype(np.float32)


class VisionTower(nnx.Module):
    def __init__(self, model_cfg: ModelConfig, *, rngs: nnx.Rngs):
        cfg = model_cfg.vision
        self.patch_size, self.image_size = cfg.patch_size, cfg.image_size
        dtype, param_dtype = dtype_of(model_cfg.dtype), dtype_of(model_cfg.param_dtype)
        self.dtype = dtype
        d, p = cfg.hidden_size, cfg.patch_size
        # Patch "conv" (stride = kernel = patch, no bias) stored as a conv kernel [p, p, C, D].
        self.patch_embed = nnx.Param(
            nnx.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=(0, 1, 2), out_axis=3)(
                rngs.params(), (p, p, cfg.num_channels, d), param_dtype),
            out_sharding=("patch", "patch", None, "vision_embed"))
        self.cls_token = nnx.Param(normal_init(0.02)(rngs.params(), (d,), param_dtype),
                                   out_sharding=("vision_embed",))
        if cfg.position_embedding_init == "sincos2d":
            table = jnp.asarray(sincos2d_position_table(cfg.image_size // p, d), param_dtype)
            rngs.params()  # keep the key sequence of the "normal" init: same weights everywhere else
        else:
            table = normal_init(0.02)(rngs.params(), (cfg.num_positions, d), param_dtype)
        self.position_embedding = nnx.Param(table, out_sharding=("positions", "vision_embed"))
        self.pre_layernorm = LayerNorm(d, eps=cfg.layer_norm_eps, param_dtype=param_dtype)
        self.layers = LayerStack(
            lambda r: VisionLayer(cfg, dtype=dtype, param_dtype=param_dtype,
                                  attention_impl=model_cfg.attention_impl, rngs=r),
            cfg.num_layers, rngs=rngs, scan=model_cfg.scan_layers, remat_policy=model_cfg.remat_policy)
        self.post_layernorm = LayerNorm(d, eps=cfg.layer_norm_eps, param_dtype=param_dtype)

    def embed(self, pixels: jax.Array) -> jax.Array:
        """[N, H, W, C] normalised pixels -> [N, 1 + patches, D] tokens after `pre_layernorm`."""
        n, h, w, c = pixels.shape
        p = self.patch_size
        if h != self.image_size or w != self.image_size:
            raise ValueError(f"images must be {self.image_size}x{self.image_size}, got {h}x{w}")
        gh, gw = h // p, w // p
        patches = pixels.astype(self.dtype).reshape(n, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(n, gh * gw, p, p, c)  # row-major patch order, like the conv
        x = jnp.einsum("npqrc,qrcd->npd", patches, self.patch_embed[...].astype(self.dtype))
        cls = jnp.broadcast_to(self.cls_token[...].astype(self.dtype), (n, 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1) + self.position_embedding[...].astype(self.dtype)
        return self.pre_layernorm(x)

    def __call__(self, pixels: jax.Array) -> jax.Array:
        """Returns post-LayerNormed hidden states of all tokens: [N, 1 + patches, D]."""
        return self.post_layernorm(self.layers(self.embed(pixels)))

    def hidden_states(self, pixels: jax.Array) -> list[jax.Array]:
        """Embeddings then every layer's output (before post_layernorm), as HF `hidden_states` gives."""
        x = self.embed(pixels)
        _, outs = self.layers.collect(x)
        return [x] + outs
