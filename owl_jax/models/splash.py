"""TPU attention for the causal decoder: Pallas splash attention, sharded over the mesh.

Why: on TPU, XLA's attention materialises the [T, S] scores of every head and computes all of them,
also the half above the causal diagonal and, in packed rows, every pair of different samples.
Splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`, the kernel MaxText runs on TPU)
tiles the product in VMEM, never writes the scores to HBM, and skips the tiles its mask marks empty:
the causal upper triangle always, other segments' tiles as the segment ids show. jax ships the kernel;
this module only chooses its block sizes, handles grouped-query heads and places it on the mesh.

A Pallas call has no partitioning rule, so under `jax.jit` with a mesh it runs inside `jax.shard_map`
(attention is independent per row and per head): rows over the mesh axes the default logical rules
give the batch (`data`, `fsdp`), heads over `tensor`, each where it divides. The mesh comes from the
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

BLOCK_SIZES = (512, 256, 128)  # tried in order: the largest that divides the sequence
BATCH_AXES = ("data", "fsdp")  # the default rules' "batch"
HEAD_AXIS = "tensor"  # the default rules' "heads" / "kv_heads"


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


def _axes_dividing(mesh, axes, size: int) -> tuple[str, ...]:
    picked, product = [], 1
    for name in axes:
        if name in mesh.shape and mesh.shape[name] > 1 and size % (product * mesh.shape[name]) == 0:
            picked.append(name)
            product *= mesh.shape[name]
    return tuple(picked)


def sharded_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None, *,
                             interpret: bool = False) -> jax.Array:
    """`causal_attention` on the context mesh: rows over data × fsdp, heads over tensor where they divide
    (query and key heads alike, else heads stay whole); the kernel sees each device's block."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or math.prod(mesh.shape.values()) == 1:
        return causal_attention(q, k, v, segment_ids, interpret=interpret)
    rows = _axes_dividing(mesh, BATCH_AXES, q.shape[0])
    heads = _axes_dividing(mesh, (HEAD_AXIS,), math.gcd(q.shape[2], k.shape[2]))
    rows_spec, heads_spec = (rows or None), (heads[0] if heads else None)
    qkv_spec = PartitionSpec(rows_spec, None, heads_spec, None)
    seg_spec = PartitionSpec(rows_spec, None)

    def local(q, k, v, seg):
        return causal_attention(q, k, v, seg, interpret=interpret)

    if segment_ids is None:
        return jax.shard_map(lambda q, k, v: local(q, k, v, None), mesh=mesh, in_specs=(qkv_spec,) * 3,
                             out_specs=qkv_spec, check_vma=False)(q, k, v)
    return jax.shard_map(local, mesh=mesh, in_specs=(qkv_spec,) * 3 + (seg_spec,), out_specs=qkv_spec,
                         check_vma=False)(q, k, v, segment_ids.astype(jnp.int32))
