"""Masked next-token cross-entropy with a chunked vocabulary projection.

A 32k vocabulary over 2048 tokens is 256 MiB of float32 logits per sequence; the projection and the
log-softmax are computed `chunk_size` tokens at a time under `jax.checkpoint`, so neither the forward nor
the backward pass holds more than one chunk of logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _chunk_nll(hidden: jax.Array, kernel: jax.Array, targets: jax.Array) -> jax.Array:
    logits = jnp.dot(hidden, kernel, preferred_element_type=jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    return lse - target_logit


def token_nll(hidden: jax.Array, kernel: jax.Array, targets: jax.Array, *, chunk_size: int = 0) -> jax.Array:
    """Per-token negative log-likelihood in float32.

    hidden [B, T, D] (final-normed), kernel [D, V], targets [B, T] -> [B, T].
    """
    b, t, d = hidden.shape
    kernel = kernel.astype(hidden.dtype)
    targets = jnp.clip(targets, 0, kernel.shape[1] - 1).astype(jnp.int32)
    n = b * t
    if chunk_size <= 0 or chunk_size >= n:
        return _chunk_nll(hidden.reshape(n, d), kernel, targets.reshape(n)).reshape(b, t)
    num_chunks = -(-n // chunk_size)
    pad = num_chunks * chunk_size - n
    h = jnp.pad(hidden.reshape(n, d), ((0, pad), (0, 0))).reshape(num_chunks, chunk_size, d)
    y = jnp.pad(targets.reshape(n), (0, pad)).reshape(num_chunks, chunk_size)
    chunk_fn = jax.checkpoint(lambda hy: _chunk_nll(hy[0], kernel, hy[1]))
    nll = jax.lax.map(chunk_fn, (h, y))
    return nll.reshape(-1)[:n].reshape(b, t)


def masked_mean(nll: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Token-mean over the batch; returns (loss, token_count). No tokens -> (0, 0), never NaN."""
    mask = mask.astype(jnp.float32)
    count = mask.sum()
    loss = jnp.sum(jnp.where(mask > 0, nll, 0.0)) / jnp.maximum(count, 1.0)
    return loss, count
