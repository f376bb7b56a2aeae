"""Host-side static-shape batching: one sample per row (`pad_batch`) or several (`pack_batch`).

The train step is compiled for one [rows, seq_len] shape, so every batch must have it. Captions and
most instructions are far shorter than seq_len (DESIGN.md §4): padding each to 2048 wastes most of the
compute, packing several samples per row is the throughput lever. A packed row carries `segment_ids`
(1..n in row order, 0 = padding), which the model turns into a block-diagonal causal mask, and
`positions` that restart at 0 in every segment, so each sample sees exactly what it would see alone
and its loss is the unpacked loss.

Targets come from each sample itself (`targets[t] = tokens[t+1]` of the same sample), and the last
position of every segment gets loss_mask False (and the pad id as target) whatever the sample says, so
no position is ever trained to predict the first token of the next segment.

Both functions return a `PackedBatch`: the arrays plus the per-row image counts and the image references
in row-major order — the order `owl_jax.models.splice.plan_micro_batched_slots` numbers images in.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence

import numpy as np

KEYS = ("tokens", "targets", "loss_mask", "positions", "segment_ids")


@dataclasses.dataclass
class PackedBatch:
    arrays: dict[str, np.ndarray]  # KEYS -> [rows, seq_len] (int32; loss_mask bool)
    num_images: np.ndarray         # [rows] int32, images of each row in order
    images: list                   # image references of all rows, row-major, segment order within a row
    placement: list[tuple[int, int, int]]  # per placed sample (input order): (row, start, segment id)
    leftover: list[int]            # input indices of samples that did not fit (pack_batch), in order


def _field(sample: Any, name: str):
    return sample[name] if isinstance(sample, Mapping) else getattr(sample, name)


def _images(sample: Any) -> list:
    images = sample.get("images") if isinstance(sample, Mapping) else getattr(sample, "images", None)
    if images is not None:
        return list(images)
    n = sample.get("num_images", 0) if isinstance(sample, Mapping) else getattr(sample, "num_images", 0)
    return [None] * int(n)


def _length(sample: Any, seq_len: int, index: int) -> int:
    n = len(_field(sample, "tokens"))
    if n == 0:
        raise ValueError(f"sample {index} is empty")
    if n > seq_len:
        raise ValueError(f"sample {index} has {n} tokens, more than seq_len={seq_len}; truncate it first "
                         f"(data_pipelines.tokenize.to_training_sample)")
    return n


def assemble(samples: Sequence[Any], rows_of: list[list[int]], seq_len: int, pad_id: int,
             leftover: list[int]) -> PackedBatch:
    """The batch with `samples[i]` for i in `rows_of[r]` packed into row r in that order (for callers that
    place samples under constraints of their own, e.g. an image budget per micro-batch)."""
    rows = len(rows_of)
    out = {"tokens": np.full((rows, seq_len), pad_id, np.int32),
           "targets": np.full((rows, seq_len), pad_id, np.int32),
           "loss_mask": np.zeros((rows, seq_len), bool),
           "positions": np.zeros((rows, seq_len), np.int32),
           "segment_ids": np.zeros((rows, seq_len), np.int32)}
    num_images = np.zeros(rows, np.int32)
    images: list = []
    placement: dict[int, tuple[int, int, int]] = {}
    for r, members in enumerate(rows_of):
        start = 0
        for seg, i in enumerate(members, start=1):
            s = samples[i]
            tokens = np.asarray(_field(s, "tokens"))
            n = len(tokens)
            sl = slice(start, start + n)
            out["tokens"][r, sl] = tokens
            out["targets"][r, sl] = np.asarray(_field(s, "targets"))
            out["loss_mask"][r, sl] = np.asarray(_field(s, "loss_mask"), bool)
            out["targets"][r, start + n - 1] = pad_id  # never predict across the segment boundary
            out["loss_mask"][r, start + n - 1] = False
            out["positions"][r, sl] = np.arange(n, dtype=np.int32)
            out["segment_ids"][r, sl] = seg
            imgs = _images(s)
            num_images[r] += len(imgs)
            images += imgs
            placement[i] = (r, start, seg)
            start += n
    return PackedBatch(out, num_images, images, [placement[i] for i in sorted(placement)], leftover)


def pad_batch(samples: Sequence[Any], seq_len: int, *, rows: Optional[int] = None, pad_id: int = 0) -> PackedBatch:
    """One sample per row, padded to seq_len; `rows` (default len(samples)) adds empty rows at the end
    (e.g. the last batch of an epoch). Samples are TrainingSample objects or mappings with tokens,
    targets, loss_mask and optionally images / num_images."""
    rows = len(samples) if rows is None else rows
    if len(samples) > rows:
        raise ValueError(f"{len(samples)} samples do not fit in {rows} rows")
    for i, s in enumerate(samples):
        _length(s, seq_len, i)
    return assemble(samples, [[i] for i in range(len(samples))] + [[] for _ in range(rows - len(samples))],
                     seq_len, pad_id, [])


def pack_batch(samples: Sequence[Any], seq_len: int, rows: int, *, pad_id: int = 0) -> PackedBatch:
    """Greedy first-fit packing: each sample, in input order, goes to the first row with room for it;
    samples that fit in no row are returned in `leftover` (carry them to the next batch). Within a row
    segments keep input order. A sample longer than seq_len is an error (truncate first)."""
    free = [seq_len] * rows
    rows_of: list[list[int]] = [[] for _ in range(rows)]
    leftover: list[int] = []
    for i, s in enumerate(samples):
        n = _length(s, seq_len, i)
        for r in range(rows):
            if free[r] >= n:
                rows_of[r].append(i)
                free[r] -= n
                break
        else:
            leftover.append(i)
    return assemble(samples, rows_of, seq_len, pad_id, leftover)
