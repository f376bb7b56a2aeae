"""Splicing visual tokens into the text sequence with static shapes.

The host (input pipeline) decides where every image goes: `plan_image_slots` turns token ids with image
placeholders (negative ids, `tokens_per_image` of them per `<image>`, the official mPLUG-Owl encoding)
into a [B, T] index into the flattened visual tokens of the batch's fixed image budget. On device,
`splice` is a single gather + select, so the compiled step never depends on where images are.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


class ImageLayoutError(ValueError):
    """The placeholders of a batch do not describe its images one-to-one."""


def _negative_runs(row: np.ndarray) -> list[tuple[int, int]]:
    """(start, length) of each maximal run of negative ids in a 1-D array."""
    neg = np.concatenate([[False], row < 0, [False]])
    edges = np.flatnonzero(neg[1:] != neg[:-1])
    return [(int(s), int(e - s)) for s, e in zip(edges[::2], edges[1::2])]


def plan_image_slots(input_ids: np.ndarray, num_images: np.ndarray, *, tokens_per_image: int,
                     image_budget: int) -> np.ndarray:
    """Map every position to the visual token it receives.

    Args:
      input_ids: [B, T] ids where each image occupies `tokens_per_image` consecutive negative ids.
      num_images: [B] images of each sample, in order; images are numbered sample-major across the batch.
      tokens_per_image: visual tokens per image (abstractor queries + `vit_eos`).
      image_budget: the fixed number of image slots of the batch.

    Returns:
      [B, T] int32: `image * tokens_per_image + j` at the j-th slot of an image, -1 at text positions.

    Raises ImageLayoutError when the layout is malformed: a run of slots whose length is not exactly one
    image (two `<image>` placeholders back to back, which the official code silently merges, losing
    the second image; or a slot cut by truncation), a sample whose placeholder count differs from its
    image count, or more images than the budget.
    """
    input_ids = np.asarray(input_ids)
    num_images = np.asarray(num_images).astype(np.int64)
    if input_ids.ndim != 2 or num_images.shape != (input_ids.shape[0],):
        raise ImageLayoutError(f"expected ids [B, T] and num_images [B], got {input_ids.shape} and "
                               f"{num_images.shape}")
    total = int(num_images.sum())
    if total > image_budget:
        raise ImageLayoutError(f"batch holds {total} images but the image budget is {image_budget}")
    index = np.full(input_ids.shape, -1, np.int32)
    image = 0
    for b, row in enumerate(input_ids):
        runs = _negative_runs(row)
        for start, length in runs:
            if length != tokens_per_image:
                what = (f"{length / tokens_per_image:g} images' worth of adjacent placeholders (separate "
                        f"<image> tags with text)" if length % tokens_per_image == 0
                        else "a partial image slot (truncated?)")
                raise ImageLayoutError(f"sample {b}: run of {length} image slots at position {start} is "
                                       f"{what}; each <image> must be exactly {tokens_per_image} slots")
        if len(runs) != num_images[b]:
            raise ImageLayoutError(f"sample {b} has {len(runs)} <image> placeholders but {num_images[b]} images")
        for start, length in runs:
            index[b, start:start + length] = image * tokens_per_image + np.arange(length)
            image += 1
    return index


def plan_micro_batched_slots(input_ids: np.ndarray, num_images: np.ndarray, *, tokens_per_image: int,
                             image_budget: int, num_micro_batches: int) -> tuple[np.ndarray, np.ndarray]:
    """Slot plan for a batch that the train step splits into `k = num_micro_batches` micro-batches.

    Micro-batch j is rows j, j+k, j+2k, ... (strided, so that every data-parallel shard holds an equal
    part of each micro-batch) and pixel rows j, j+k, ...: each micro-batch has its own budget of
    `image_budget / k` images and `image_index` counts within it.

    Returns (image_index [B, T], pixel_row [total images]): the pixel row that each image (in
    sample-major order of the batch) must be written to.
    """
    input_ids = np.asarray(input_ids)
    num_images = np.asarray(num_images)
    k = num_micro_batches
    b = input_ids.shape[0]
    if b % k or image_budget % k:
        raise ImageLayoutError(f"batch of {b} rows and {image_budget} image slots cannot be split into {k} "
                               f"micro-batches evenly")
    index = np.full(input_ids.shape, -1, np.int32)
    starts = np.concatenate([[0], np.cumsum(num_images)])
    pixel_row = np.zeros(int(num_images.sum()), np.int64)
    for j in range(k):
        rows = np.arange(j, b, k)
        try:
            index[rows] = plan_image_slots(input_ids[rows], num_images[rows], tokens_per_image=tokens_per_image,
                                           image_budget=image_budget // k)
        except ImageLayoutError as e:
            raise ImageLayoutError(f"micro-batch {j} (rows {j}::{k}): {e}") from None
        local = 0
        for r in rows:
            for i in range(starts[r], starts[r + 1]):
                pixel_row[i] = local * k + j
                local += 1
    return index, pixel_row


def splice(text_embeds: jax.Array, visual_tokens: jax.Array, image_index: jax.Array) -> jax.Array:
    """Replace the embeddings at image slots with visual tokens.

    text_embeds [B, T, D]; visual_tokens [N, tokens_per_image, D]; image_index [B, T] from
    `plan_image_slots` (-1 = keep the text embedding).
    """
    flat = visual_tokens.reshape(-1, visual_tokens.shape[-1]).astype(text_embeds.dtype)
    gathered = jnp.take(flat, jnp.maximum(image_index, 0), axis=0)
    return jnp.where((image_index >= 0)[..., None], gathered, text_embeds)
