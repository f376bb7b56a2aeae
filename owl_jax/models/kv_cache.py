"""The LLaMA decoder run against a key/value cache: a functional path next to the training forward.

Generation needs each step to attend to the keys and values of every earlier position without
recomputing them. Rather than giving the modules mutable cache variables (which would change the training
graph and its state), these functions read the decoder's submodules and thread the cache through as
plain arrays: `(keys, values)` of shape [layers, batch, max_len, kv_heads, head_dim], written with
`dynamic_update_slice`, so a jitted caller can preallocate it, donate it and keep every shape static.

Rows are left-padded: row b's real tokens occupy cache slots `pad[b] .. ` and every row writes the same
slot at each step (one scalar write index for the batch). A query at slot i may see the keys at slots j
with `pad[b] <= j <= i`; positions (RoPE) count from the first real token of each row, so a padded row
computes what the same prompt computes alone.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from owl_jax.models.layers import LayerStack, attention
from owl_jax.models.llama import LlamaLayer, LlamaModel, apply_rope, rope_tables

Cache = tuple[jax.Array, jax.Array]  # (keys, values), each [layers, batch, max_len, kv_heads, head_dim]


def init_cache(lm: LlamaModel, batch: int, max_len: int) -> Cache:
    """Zeroed keys and values (in the compute dtype) for `batch` rows of up to `max_len` positions."""
    stack = lm.layers
    attn = stack.layers.self_attn if stack.scan else stack.layers[0].self_attn
    shape = (stack.num_layers, batch, max_len, attn.num_kv_heads, attn.head_dim)
    return jnp.zeros(shape, lm.dtype), jnp.zeros(shape, lm.dtype)


def cache_mask(pad: jax.Array, first_query_slot: jax.Array | int, num_queries: int, num_keys: int) -> jax.Array:
    """[B, 1, T, S] attention mask: the query at slot q = first_query_slot + t sees keys at slots
    `pad[b] <= j <= q`. A padding query (q < pad[b]) sees only itself, so no softmax row is empty; its
    output is never read by a real token."""
    q = first_query_slot + jnp.arange(num_queries)[:, None]
    j = jnp.arange(num_keys)[None, :]
    visible = (j >= pad[:, None, None]) & (j <= q[None])
    return (visible | (j == q)[None])[:, None]


def _layer(layer: LlamaLayer, x: jax.Array, cos: jax.Array, sin: jax.Array, cache: Cache, index: jax.Array,
           write_slot: jax.Array | int, mask: jax.Array, attend_to_cache: bool) -> tuple[jax.Array, Cache]:
    """One decoder layer (the math of `LlamaLayer.__call__`) that writes its keys/values at `write_slot`
    of layer `index` of the cache and attends either to the whole cache (decode) or only to the keys of
    `x` itself (prefill, which starts at slot 0: cheaper than attending to the empty rest)."""
    attn = layer.self_attn
    b, t, _ = x.shape
    h = layer.input_layernorm(x)
    q = apply_rope(attn.q_proj(h).reshape(b, t, attn.num_heads, attn.head_dim), cos, sin)
    k = apply_rope(attn.k_proj(h).reshape(b, t, attn.num_kv_heads, attn.head_dim), cos, sin)
    v = attn.v_proj(h).reshape(b, t, attn.num_kv_heads, attn.head_dim)
    keys, values = cache
    start = (index, 0, write_slot, 0, 0)
    keys = jax.lax.dynamic_update_slice(keys, k[None].astype(keys.dtype), start)
    values = jax.lax.dynamic_update_slice(values, v[None].astype(values.dtype), start)
    if attend_to_cache:
        k = jax.lax.dynamic_index_in_dim(keys, index, 0, keepdims=False).astype(q.dtype)
        v = jax.lax.dynamic_index_in_dim(values, index, 0, keepdims=False).astype(q.dtype)
    out = attention(q, k, v, mask=mask)
    x = x + attn.o_proj(out.reshape(b, t, attn.num_heads * attn.head_dim))
    x = x + layer.mlp(layer.post_attention_layernorm(x))
    return x, (keys, values)


def _layers(stack: LayerStack, x, cos, sin, cache: Cache, write_slot, mask, attend_to_cache: bool):
    if not stack.scan:
        for i, layer in enumerate(stack.layers):
            x, cache = _layer(layer, x, cos, sin, cache, jnp.int32(i), write_slot, mask, attend_to_cache)
        return x, cache

    # A plain lax.scan over the stacked parameters (not nnx.scan): this runs inside the decode loop's
    # while_loop, where nnx transforms refuse modules created at the outer trace level.
    layer_def, layer_state = nnx.split(stack.layers)

    def run(carry, params):
        h, c, i = carry
        h, c = _layer(nnx.merge(layer_def, params), h, cos, sin, c, i, write_slot, mask, attend_to_cache)
        return (h, c, i + 1), None

    (x, cache, _), _ = jax.lax.scan(run, (x, cache, jnp.int32(0)), layer_state)
    return x, cache


def forward_with_cache(lm: LlamaModel, embeds: jax.Array, positions: jax.Array, cache: Cache, *,
                       pad: jax.Array, write_slot: jax.Array | int, attend_to_cache: bool) -> tuple[jax.Array, Cache]:
    """Final-normed hidden states [B, T, D] of `embeds` [B, T, D] placed at cache slots
    `write_slot .. write_slot + T - 1`, and the updated cache.

    `positions` [B, T] are the RoPE positions (slot - pad[b] for real tokens); `pad` [B] the number of
    left-padding slots of each row. `attend_to_cache=False` (prefill at slot 0) attends among the T new
    positions only; True (decode) attends to every cache slot allowed by `cache_mask`.
    """
    t = embeds.shape[1]
    num_keys = cache[0].shape[2] if attend_to_cache else t
    mask = cache_mask(pad, write_slot, t, num_keys)
    cos, sin = rope_tables(positions, lm.inv_freq)
    x, cache = _layers(lm.layers, embeds.astype(lm.dtype), cos, sin, cache, write_slot, mask, attend_to_cache)
    return lm.norm(x), cache
