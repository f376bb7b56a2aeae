"""TPU attention for the causal decoder: Pallas splash attention, sharded over the mesh.

Why: on TPU, XLA's attention materialises the [T, S] scores of every head and computes all of them,
also the half above the causal diagonal and, in packed rows, every pair of different samples.
Splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`, the kernel MaxText runs on TPU)
tiles the product in VMEM, never writes the scores to HBM, and skips the tiles its mask marks empty:
the causal upper triangle always, other segments' tiles as the segment ids show. jax ships the kernel;
this module only chooses its block sizes, handles grouped-query heads and places it on the mesh.

A Pallas call has no partitioning rule, so under `jax.jit` with a mesh it runs inside `jax.shard_map`
(attention is independent per row and per head): rows over the mesh axes the default logical rules
give the batch (`data`, `fsdp`), heads over `tensor`, each where it divides (`logical_to_mesh_spec`). The mesh comes from the
context (`jax.set_mesh`, which the trainer and the AOT compile set); without one the kernel runs as is.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash_kernel
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
from jax.sharding import PartitionSpec

from owl_jax.sharding import BATCH_AXES, logical_to_mesh_spec

BLOCK_SIZES = (512, 256, 128)  # tried in order: the largest that divides the sequence
# How the step lays out q, k, v: rows as the batch is placed (owl_jax.sharding.batch_sharding), heads as
# the default rules place the q/k/v projections' "heads" / "kv_heads" outputs.
_ACTIVATION_RULES = (("batch", BATCH_AXES), ("heads", ("tensor",)))


def splash_block(length: int) -> int | None:
    """The tile size for a sequence of `length` tokens (None: the kernel cannot tile it)."""
    return next((b for b in BLOCK_SIZES if length % b == 0), None)


def supports(q_len: int, kv_len: int) -> bool:
    """Whether causal self-attention of this length runs in the kernel (else the XLA path serves it)."""
    return q_len == kv_len and splash_block(q_len) is not None


@functools.lru_cache(maxsize=None)
def _kernel(heads: int, length: int, mqa: bool, interpret: bool):
    """One kernel per (local heads, length): the mask tables are built on the host once."""
    block = splash_block(length)
    sizes = splash_kernel.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                                     block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block,
                                     block_kv_dq=block)
    mask = splash_mask.MultiHeadMask([splash_mask.CausalMask((length, length))] * heads)
    make = splash_kernel.make_splash_mqa if mqa else splash_kernel.make_splash_mha
    return make(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None, *,
                     interpret: bool = False) -> jax.Array:
    """Causal (and, with segment ids, block-diagonal) attention on [B, T, N, H] queries and [B, T, K, H]
    keys / values on one device's rows and heads; `interpret` runs the kernel on any backend (tests)."""
    b, t, n, h = q.shape
    kh = k.shape[2]
    if not supports(t, k.shape[1]):
        raise ValueError(f"splash attention tiles causal self-attention of a multiple of {BLOCK_SIZES[-1]} tokens, "
                         f"got {t} queries and {k.shape[1]} keys")
    q = q * np.float32(1.0 / math.sqrt(h)).astype(q.dtype)
    g = n // kh
    kernel = _kernel(g if g > 1 else n, t, g > 1, interpret)

    def one_row(q, k, v, seg):  # [N, T, H] / [K, T, H]
        ids = None if seg is None else splash_kernel.SegmentIds(q=seg, kv=seg)
        if g == 1:
            return kernel(q, k, v, segment_ids=ids)
        # grouped-query heads: the G query heads of each key head as one multi-query problem
        out = jax.vmap(lambda qg, kg, vg: kernel(qg, kg, vg, segment_ids=ids))(q.reshape(kh, g, t, h), k, v)
        return out.reshape(n, t, h)

    heads_first = lambda x: x.transpose(0, 2, 1, 3)
    out = jax.vmap(one_row)(heads_first(q), heads_first(k), heads_first(v), segment_ids)
    return out.transpose(0, 2, 1, 3)


def sharded_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None, *,
                             interpret: bool = False) -> jax.Array:
    """`causal_attention` on the context mesh: rows over data × fsdp, heads over tensor where they divide
    (query and key heads alike, else heads stay whole); the kernel sees each device's block."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or math.prod(mesh.shape.values()) == 1:
        return causal_attention(q, k, v, segment_ids, interpret=interpret)
    # heads split only as far as both query and key heads divide (a key head's queries stay together)
    b, t, n, h = q.shape
    qkv_spec = logical_to_mesh_spec(("batch", None, "heads", None), (b, t, math.gcd(n, k.shape[2]), h), mesh,
                                    _ACTIVATION_RULES)
    args, specs = (q, k, v), (qkv_spec,) * 3
    if segment_ids is not None:
        args, specs = args + (segment_ids.astype(jnp.int32),), specs + (PartitionSpec(qkv_spec[0], None),)

    def local(q, k, v, *seg):
        return causal_attention(q, k, v, seg[0] if seg else None, interpret=interpret)

    return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=qkv_spec, check_vma=False)(*args)
