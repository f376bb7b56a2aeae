"""The ViT vision towers: CLIP with mPLUG-Owl's conventions (DESIGN.md §2) and BLIP-2's (`vision.kind`).

Differences from Hugging Face `CLIPVisionModel` that matter for weights and numbers:
- one fused `query_key_value` projection whose 3·D outputs are laid out [heads, 3, head_dim];
- mPLUG-Owl's LayerNorms use eps 1e-6 (`vision.layer_norm_eps`; CLIP / LLaVA 1e-5); for the abstractor the
  post-LayerNorm is applied to all tokens (CLS included). Which hidden states feed the connector (LLaVA:
  layer -2 without CLS, no post-LayerNorm) is the connector's choice (`owl_jax.models.connectors`).

`vision.kind: blip2` is transformers' `Blip2VisionModel` (BLIP-2, InstructBLIP, MiniGPT-4: EVA ViT-g/14 at full
size, 39 layers of width 1408 in transformers' conversion): the patch conv has a bias, there is no
pre-LayerNorm, attention is one `qkv` Linear in [3, heads, head_dim] order with learned q and v biases and
none on k (transformers stores a 3·D `qkv.bias` whose k third stays zero), the output Linear is `projection`,
the MLP uses exact GELU and the post-LayerNorm is applied to the last layer's output, all tokens. Parameter
names are CLIP's where the parts are the same (`patch_embed`, `cls_token`, `position_embedding`,
`input_layernorm`, ...), so weight decay, FLOP counts and LoRA patterns treat both towers alike.
Images are NHWC float arrays already normalised with the CLIP mean/std (BLIP-2 uses the same).
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


# `VisionConfig.hidden_act`, named as HF CLIP configs name them.
ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": lambda x: jax.nn.gelu(x, approximate=False),
               "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True)}


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


class Blip2VisionAttention(nnx.Module):
    """BLIP-2's attention: `qkv` without a bias in [3, heads, head_dim] order, then `q_bias` and `v_bias` added
    to q and v. A bias on k would add q·b_k to every score of a query, which softmax removes: BLIP-2 has none."""

    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, attention_impl: str, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.attention_impl = attention_impl
        self.qkv = Dense(d, 3 * d, axes=("vision_embed", "qkv"), use_bias=False, dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs)
        self.q_bias = nnx.Param(jnp.zeros((d,), param_dtype), out_sharding=("qkv",))
        self.v_bias = nnx.Param(jnp.zeros((d,), param_dtype), out_sharding=("qkv",))
        self.projection = Dense(d, d, axes=("qkv", "vision_embed"), use_bias=True, dtype=dtype,
                                param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        h = self.num_heads
        qkv = self.qkv(x).reshape(b, t, 3, h, d // h)
        q = qkv[:, :, 0] + self.q_bias[...].astype(qkv.dtype).reshape(h, d // h)
        v = qkv[:, :, 2] + self.v_bias[...].astype(qkv.dtype).reshape(h, d // h)
        out = attention(q, qkv[:, :, 1], v, implementation=self.attention_impl)
        return self.projection(out.reshape(b, t, d))


class VisionMLP(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.fc1 = Dense(cfg.hidden_size, cfg.intermediate_size, axes=("vision_embed", "mlp"), use_bias=True,
                         dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc2 = Dense(cfg.intermediate_size, cfg.hidden_size, axes=("mlp", "vision_embed"), use_bias=True,
                         dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.hidden_act = cfg.hidden_act

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(ACTIVATIONS[self.hidden_act](self.fc1(x)))


class VisionLayer(nnx.Module):
    """Pre-norm transformer block: x + attn(ln(x)); x + mlp(ln(x))."""

    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, attention_impl: str, rngs: nnx.Rngs):
        self.input_layernorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, param_dtype=param_dtype)
        attention_cls = Blip2VisionAttention if cfg.kind == "blip2" else VisionAttention
        self.self_attn = attention_cls(cfg, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl,
                                       rngs=rngs)
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
    """Patch embedding, pre-LayerNorm (CLIP), transformer layers, post-LayerNorm; `__call__` gives the features
    the model's connector reads (`owl_jax.models.connectors.vision_features`)."""

    def __init__(self, model_cfg: ModelConfig, *, rngs: nnx.Rngs):
        from owl_jax.models.connectors import vision_features
        cfg = model_cfg.vision
        self.patch_size, self.image_size = cfg.patch_size, cfg.image_size
        self.kind = cfg.kind
        spec = vision_features(model_cfg)
        self.feature_layers, self.drop_cls, self.feature_post_layernorm = spec.layers, spec.drop_cls, spec.post_layernorm
        dtype, param_dtype = dtype_of(model_cfg.dtype), dtype_of(model_cfg.param_dtype)
        self.dtype = dtype
        d, p = cfg.hidden_size, cfg.patch_size
        # Patch "conv" (stride = kernel = patch, no bias) stored as a conv kernel [p, p, C, D].
        self.patch_embed = nnx.Param(
            nnx.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=(0, 1, 2), out_axis=3)(
                rngs.params(), (p, p, cfg.num_channels, d), param_dtype),
            out_sharding=("patch", "patch", None, "vision_embed"))
        if cfg.kind == "blip2":  # BLIP-2's patch conv has a bias (CLIP's has none)
            self.patch_bias = nnx.Param(jnp.zeros((d,), param_dtype), out_sharding=("vision_embed",))
        self.cls_token = nnx.Param(normal_init(0.02)(rngs.params(), (d,), param_dtype),
                                   out_sharding=("vision_embed",))
        if cfg.position_embedding_init == "sincos2d":
            table = jnp.asarray(sincos2d_position_table(cfg.image_size // p, d), param_dtype)
            rngs.params()  # keep the key sequence of the "normal" init: same weights everywhere else
        else:
            table = normal_init(0.02)(rngs.params(), (cfg.num_positions, d), param_dtype)
        self.position_embedding = nnx.Param(table, out_sharding=("positions", "vision_embed"))
        if cfg.kind == "clip":  # CLIP's `ln_pre`; BLIP-2 goes from the embeddings straight into the layers
            self.pre_layernorm = LayerNorm(d, eps=cfg.layer_norm_eps, param_dtype=param_dtype)
        self.layers = LayerStack(
            lambda r: VisionLayer(cfg, dtype=dtype, param_dtype=param_dtype,
                                  attention_impl=model_cfg.attention_impl, rngs=r),
            cfg.num_layers, rngs=rngs, scan=model_cfg.scan_layers, remat_policy=model_cfg.remat_policy)
        self.post_layernorm = LayerNorm(d, eps=cfg.layer_norm_eps, param_dtype=param_dtype)

    def embed(self, pixels: jax.Array) -> jax.Array:
        """[N, H, W, C] normalised pixels -> [N, 1 + patches, D] tokens (CLIP: after `pre_layernorm`)."""
        n, h, w, c = pixels.shape
        p = self.patch_size
        if h != self.image_size or w != self.image_size:
            raise ValueError(f"images must be {self.image_size}x{self.image_size}, got {h}x{w}")
        gh, gw = h // p, w // p
        patches = pixels.astype(self.dtype).reshape(n, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(n, gh * gw, p, p, c)  # row-major patch order, like the conv
        x = jnp.einsum("npqrc,qrcd->npd", patches, self.patch_embed[...].astype(self.dtype))
        if self.kind == "blip2":
            x = x + self.patch_bias[...].astype(self.dtype)
        cls = jnp.broadcast_to(self.cls_token[...].astype(self.dtype), (n, 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1) + self.position_embedding[...].astype(self.dtype)
        return self.pre_layernorm(x) if self.kind == "clip" else x

    def __call__(self, pixels: jax.Array) -> jax.Array:
        """The connector's input [N, tokens, D · len(feature_layers)]: the selected hidden states (HF
        indexing: 0 = embeddings, i = after layer i) concatenated on the feature axis in the configured order,
        each post-LayerNormed if so configured, CLS dropped if so configured. mPLUG-Owl: the post-LayerNormed
        last layer, all 1 + patches tokens. Layers after the deepest selected one are not run."""
        hidden = {0: self.embed(pixels)}
        done = 0
        for end in sorted(set(self.feature_layers) - {0}):
            hidden[end] = self.layers(hidden[done], start=done, stop=end)
            done = end
        feats = [hidden[i] for i in self.feature_layers]
        if self.feature_post_layernorm:
            feats = [self.post_layernorm(f) for f in feats]
        if self.drop_cls:
            feats = [f[:, 1:] for f in feats]
        return feats[0] if len(feats) == 1 else jnp.concatenate(feats, axis=-1)

    def hidden_states(self, pixels: jax.Array) -> list[jax.Array]:
        """Embeddings then every layer's output (before post_layernorm), as HF `hidden_states` gives."""
        x = self.embed(pixels)
        _, outs = self.layers.collect(x)
        return [x] + outs
