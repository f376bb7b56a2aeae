"""Stage-1 input pipeline: image-caption webdataset shards -> static-shape training batches.

Per process: take this process's positions of the deterministic order (`order.py`), decode images in
worker processes (`multiprocessing` spawn pool, ordered results, `prefetch` samples ahead), tokenise
captions with the caption template, skip and count bad samples, and emit batches of `rows` rows ×
`seq_len` tokens with a fixed image budget. The iterator state (`state()`) covers exactly the samples
returned so far, so restoring it replays the same batches even though workers decode ahead.

With `packing`, several caption samples share a row (first fit; segment ids, restarting positions: see
`packing.py`), each bringing its image, until a sample fits in no row whose micro-batch still has an
image slot. A caption sample is ~90 tokens (64 visual + ~25 text) of a 512-token row, so padding wastes
~80% of the frozen LLM's compute, which is most of stage 1's (DESIGN.md §5). The sample that did not fit
opens the next batch; it is always the next sample of this process's order, so the saved state is simply
the state from before it (restoring re-reads it) and resume stays exact.

Skips. A bad sample is skipped every time the order reaches it but counted once over the run: during the
first pass (epoch 0, where each sample has exactly one position and one process takes it; see
`order.py`), so the counts survive resume and re-splits and sum over processes to distinct samples.
`skip_counts()` gives them by reason (sample reasons, plus `unreadable_shard` / `truncated_shard`, each
shard counted once, by the process its number falls to). `data.max_skip_fraction` compares the
first-pass bad samples with the first-pass samples taken (`considered`), both counted the same way.

At the end of a finite run (`epochs`) the last batch keeps the samples it has and pads the other rows
(segment id 0, no loss, no image), as the instruction pipeline does, so one pass shows every sample.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import multiprocessing
from typing import Iterator, NamedTuple, Optional, Sequence

import numpy as np

from data_pipelines import images as image_ops
from data_pipelines.order import StreamState, epoch_shard_order, positions, remap_states, window_sample_order
from data_pipelines.shards import SampleRef, ShardError, expand_sources, open_shard, read_member
from data_pipelines.tokenize import encode_template_text

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


class DataError(RuntimeError):
    """The data cannot feed the run (too many bad samples, nothing usable)."""


class CaptionSampleInfo(NamedTuple):
    """Where a sample of the last batch went: its shard key, row and segment id in the row."""
    key: str
    row: int
    segment: int


@dataclasses.dataclass(frozen=True)
class DecodeTask:
    position: tuple[int, int, int]
    ref: SampleRef
    image_size: int
    train: bool
    seed: int
    max_pixels: int
    hflip: bool = True


def read_raw(ref: SampleRef) -> tuple[bytes, bytes | str]:
    """(encoded image, caption as stored) of a sample: members of a tar shard, or a record of a TFDS
    dataset (`tfds_source`: one member `tfds` whose offset is the record number)."""
    members = ref.members()
    if "tfds" in members:
        from data_pipelines import tfds_source
        image, caption = tfds_source.read_example(ref.path, members["tfds"][0])
        if caption is None:
            raise image_ops.BadSample("missing_caption")
        return image, caption
    image_ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
    found = ", ".join(f".{e}" for e in sorted(members)) or "no members"
    if image_ext is None:
        wanted = ", ".join(f".{e}" for e in IMAGE_EXTENSIONS)
        raise image_ops.BadSample("missing_image", f"no image member ({wanted}); found {found}")
    if "txt" not in members:
        raise image_ops.BadSample("missing_caption", f"no .txt member; found {found}")
    return read_member(ref.path, *members[image_ext]), read_member(ref.path, *members["txt"])


def decode_sample(task: DecodeTask):
    """Worker function: (position, key, uint8 pixels or None, caption or None, bad reason or None, detail)."""
    ref = task.ref
    try:
        image_data, raw_caption = read_raw(ref)
        try:
            caption = raw_caption.decode("utf-8") if isinstance(raw_caption, bytes) else str(raw_caption)
        except UnicodeDecodeError:
            raise image_ops.BadSample("non_utf8_caption") from None
        caption = caption.strip()
        if not caption:
            raise image_ops.BadSample("empty_caption")
        image = image_ops.decode_image(image_data, max_pixels=task.max_pixels)
        rng = np.random.default_rng([task.seed, *task.position]) if task.train else None
        # uint8 across the process boundary (a quarter of the float32 bytes to pickle); next_sample
        # normalises.
        pixels = image_ops.preprocess(image, task.image_size, train=task.train, rng=rng, hflip=task.hflip,
                                      normalize=False)
        return task.position, ref.key, pixels, caption, None, ""
    except image_ops.BadSample as e:
        return task.position, ref.key, None, None, e.reason, str(e).removeprefix(e.reason).removeprefix(": ")
    except (OSError, ShardError) as e:
        return task.position, ref.key, None, None, "read_error", str(e)


def decode_chunk(tasks: list[DecodeTask]) -> list:
    return [decode_sample(t) for t in tasks]


def prefetched(pool, tasks: Iterator[DecodeTask], prefetch: int, chunk: int) -> Iterator:
    """`decode_sample` over `tasks` in order, in `pool`, with at most about `prefetch` samples submitted
    ahead of the consumer (chunks of `chunk` tasks). `pool.imap` would not do: it reads its whole input
    and keeps every result until it is consumed, so when training is slower than decoding (the usual
    case) decoded images pile up in memory without bound."""
    pending: collections.deque = collections.deque()
    exhausted = False
    while True:
        while not exhausted and len(pending) * chunk < prefetch:
            block = list(itertools.islice(tasks, chunk))
            exhausted = len(block) < chunk
            if block:
                pending.append(pool.apply_async(decode_chunk, (block,)))
        if not pending:
            return
        yield from pending.popleft().get()


class CaptionTokenizer:
    """Caption -> (tokens with image slots, loss mask) with the template's text before/after the caption
    unweighted and the caption plus EOS weighted."""

    def __init__(self, tokenizer, template: str, tokens_per_image: int):
        if "{caption}" not in template or template.count("<image>") != 1:
            raise ValueError(f"caption_template {template!r} needs one <image> and one {{caption}}")
        self.tokenizer, self.tokens_per_image = tokenizer, tokens_per_image
        before, after = template.split("{caption}")
        pre_image, post_image = before.split("<image>") if "<image>" in before else (before, "")
        bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
        self.prefix = (bos + self._encode(pre_image) + [-1] * tokens_per_image
                       + self._encode(post_image))
        self.suffix = self._encode(after)
        if "<image>" in after:
            raise ValueError("put <image> before {caption} in caption_template")

    def _encode(self, text: str) -> list[int]:
        return encode_template_text(self.tokenizer, text)

    def __call__(self, caption: str, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        body = list(self.tokenizer.encode(caption)) if caption else []  # one piece, like an answer
        room = seq_len - len(self.prefix) - len(self.suffix) - 1
        if room < 1:
            raise DataError(f"seq_len {seq_len} leaves no room for a caption after the template")
        body = body[:room]  # a cut caption keeps its EOS (below)
        tokens = self.prefix + body + self.suffix + [self.tokenizer.eos_id]
        weighted = [False] * len(self.prefix) + [True] * len(body) + [False] * len(self.suffix) + [True]
        return np.asarray(tokens, np.int64), np.asarray(weighted, bool)


class CaptionPipeline:
    """Iterator of per-process batches (numpy dicts) for stage-1 training. See module docstring."""

    def __init__(self, sources: Sequence[str] | str, *, tokenizer, seq_len: int, rows: int, image_budget: int,
                 image_size: int, tokens_per_image: int, template: str = "<image>{caption}", seed: int = 0,
                 shuffle: bool = True, shuffle_shards: int = 8, train: bool = True, hflip: bool = True,
                 num_workers: int = 0,
                 prefetch: int = 64, process_index: int = 0, num_processes: int = 1,
                 micro_batches: int = 1, max_skip_fraction: float = 0.1, max_pixels: int = image_ops.DEFAULT_MAX_PIXELS,
                 cache_dir: str | None = None, epochs: Optional[int] = None, packing: bool = False,
                 state: dict | None = None):
        self.sources = expand_sources(sources)
        if not self.sources:
            raise DataError(f"no shards match {sources!r}")
        if image_budget < rows or image_budget % micro_batches or rows % micro_batches:
            raise DataError(f"{rows} rows and {image_budget} image slots per process must split into "
                            f"{micro_batches} micro-batches, with at least one slot per row")
        self.seq_len, self.rows, self.image_budget = seq_len, rows, image_budget
        self.image_size, self.tokens_per_image, self.micro_batches = image_size, tokens_per_image, micro_batches
        self.seed, self.shuffle, self.shuffle_shards, self.train = seed, shuffle, shuffle_shards, train
        self.hflip = hflip
        self.num_workers, self.prefetch, self.max_pixels = num_workers, prefetch, max_pixels
        self.max_skip_fraction, self.cache_dir, self.epochs = max_skip_fraction, cache_dir, epochs
        self.packing = packing
        # packing: the decoded sample that did not fit the last batch, and the state from before it
        self._held: tuple | None = None
        self._held_state: dict | None = None
        self._state_before_usable: dict | None = None
        self.last_batch: list[CaptionSampleInfo] = []  # the samples of the last batch
        self.captions = CaptionTokenizer(tokenizer, template, tokens_per_image)
        self.pad_id = tokenizer.pad_id
        self._state = (StreamState.from_json(state) if state is not None
                       else StreamState(process_index=process_index, num_processes=num_processes))
        if (self._state.process_index, self._state.num_processes) != (process_index, num_processes):
            raise DataError(f"iterator state is for process {self._state.process_index} of "
                            f"{self._state.num_processes}, not {process_index} of {num_processes}; "
                            f"remap saved states with CaptionPipeline.remap_states")
        self._windows: dict[tuple[int, int], list[SampleRef]] = {}
        self._bad_shards: set[str] = set()  # shards this process has warned about
        self._examples: dict[str, str] = {}  # reason -> the first sample / shard skipped for it (for errors)
        self._first_pass_checked = False  # the skip fraction of the whole first pass (epoch 0) was checked
        self._pool = None
        self._results: Iterator | None = None
        self._last_good_epoch = self._state.epoch - 1 if self._state.seen == 0 else self._state.epoch

    # ---------------------------------------------------------------- order and shard indexes
    def _num_windows(self) -> int:
        return -(-len(self.sources) // self.shuffle_shards)

    def _window(self, epoch: int, window: int) -> list[SampleRef]:
        key = (epoch, window)
        if key not in self._windows:
            order = epoch_shard_order(len(self.sources), epoch, self.seed, self.shuffle)
            chosen = order[window * self.shuffle_shards:(window + 1) * self.shuffle_shards]
            refs: list[SampleRef] = []
            for i in chosen:
                source = self.sources[i]
                try:
                    index = open_shard(source, cache_dir=self.cache_dir)
                except ShardError as e:
                    self._shard_failed(i, "unreadable_shard", str(e))
                    continue
                if index.truncated:
                    self._shard_failed(i, "truncated_shard", f"damaged; kept the {len(index.samples)} complete "
                                                             f"samples before the damage")
                refs.extend(index.samples)
            sample_order = window_sample_order(len(refs), epoch, window, self.seed, self.shuffle)
            self._windows = {k: v for k, v in self._windows.items() if k[0] >= epoch}  # bounded cache
            self._windows[key] = [refs[i] for i in sample_order]
        return self._windows[key]

    def window_size(self, epoch: int, window: int) -> int | None:
        return len(self._window(epoch, window)) if window < self._num_windows() else None

    def _tasks(self) -> Iterator[DecodeTask]:
        st = dataclasses.replace(self._state, exclude=list(self._state.exclude))
        while self.epochs is None or st.epoch < self.epochs:
            sizes = (len(self._window(st.epoch, w)) for w in range(self._num_windows()))
            for pos in positions(st, sizes):
                yield DecodeTask(pos, self._window(pos[0], pos[1])[pos[2]], self.image_size, self.train,
                                 self.seed, self.max_pixels, self.hflip)
            if not self._any_samples(st.epoch):
                raise DataError(f"no samples at all in {len(self.sources)} shards ({self._skip_summary()})")
            st = StreamState(process_index=st.process_index, num_processes=st.num_processes, epoch=st.epoch + 1,
                             exclude=[p for p in st.exclude if p[0] > st.epoch])

    def _any_samples(self, epoch: int) -> bool:
        return any(self._window(epoch, w) for w in range(self._num_windows()))

    # ---------------------------------------------------------------- decoding
    def _decoded(self) -> Iterator:
        if self.num_workers <= 0:
            return map(decode_sample, self._tasks())
        ctx = multiprocessing.get_context("spawn")
        self._pool = ctx.Pool(self.num_workers)
        chunk = max(1, min(8, self.prefetch // (2 * self.num_workers)))
        return prefetched(self._pool, self._tasks(), self.prefetch, chunk)

    def _count(self, reason: str, key: str, detail: str, first_pass: bool = True) -> None:
        """Count a skipped sample (first pass only: see the module docstring) and log it."""
        if not first_pass:
            log.debug("skipping %s again (%s): %s", key, reason, detail)
            return
        self._state.skipped[reason] = self._state.skipped.get(reason, 0) + 1
        self._examples.setdefault(reason, f"{key}: {detail}" if detail else key)
        log.warning("skipping %s (%s): %s", key, reason, detail)

    def _shard_failed(self, number: int, reason: str, detail: str) -> None:
        """A shard that is unreadable or damaged: warned about once per process, counted once per run by
        the process its number falls to (`bad_shards` in the state remembers it across resumes)."""
        source, st = self.sources[number], self._state
        if source not in self._bad_shards:
            self._bad_shards.add(source)
            log.warning("shard %s (%s): %s", source, reason, detail)
        self._examples.setdefault(reason, f"{source}: {detail}")
        if number not in st.bad_shards and number % st.num_processes == st.process_index:
            st.bad_shards.append(number)
            st.skipped[reason] = st.skipped.get(reason, 0) + 1

    def skip_counts(self) -> dict[str, int]:
        """{reason: distinct bad samples (or shards, `*_shard`) skipped so far by this process}."""
        return dict(self._state.skipped)

    def _skip_summary(self) -> str:
        """The skip counters and one example per reason, for error messages."""
        examples = "; ".join(f"{reason}: {self._examples[reason]}" for reason in list(self._examples)[:4])
        return f"{dict(self._state.skipped)}" + (f"; e.g. {examples}" if examples else "")

    def _advance(self, position) -> None:
        epoch, window, index = position
        self._state.epoch, self._state.window, self._state.index = epoch, window, index + self._state.num_processes
        self._state.exclude = [p for p in self._state.exclude if p > position]

    def _check_skips(self, final: bool = False) -> None:
        """DataError when more than max_skip_fraction of the first-pass samples were bad: from 200 samples
        on, and at the end of the first pass (`final`) whatever the count (data smaller than 200 samples
        is checked too, once all of it is known)."""
        bad = sum(v for k, v in self._state.skipped.items() if not k.endswith("_shard"))
        total = self._state.considered
        if (total >= 200 or (final and total)) and bad > self.max_skip_fraction * total:
            raise DataError(f"{bad} of {total} samples were unusable ({self._skip_summary()}), more than "
                            f"data.max_skip_fraction={self.max_skip_fraction}; fix the data or raise the limit")

    def next_sample(self) -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
        """(sample key, pixels, tokens with image slots, weighted positions) of the next usable sample."""
        key, pixels, tokens, weighted = self._take()
        return key, image_ops.clip_normalize(pixels), tokens, weighted

    def _take(self) -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
        """The sample held over from the last packed batch if there is one, else the next usable one."""
        if self._held is None:
            return self._next_usable()
        sample, self._held, self._held_state = self._held, None, None
        return sample

    def _next_usable(self) -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
        """next_sample with uint8 pixels (batches normalise them straight into their pixel rows)."""
        if self._results is None:
            self._results = self._decoded()
        while True:
            try:
                position, key, pixels, caption, reason, detail = next(self._results)
            except StopIteration:
                raise StopIteration from None
            if reason is None and self.packing:
                self._state_before_usable = self._state.to_json()
            self._advance(position)
            if position[0] > self._last_good_epoch + 1:
                raise DataError(f"a whole epoch without one usable sample ({self._skip_summary()})")
            first_pass = position[0] == 0
            self._state.considered += first_pass
            if not first_pass and not self._first_pass_checked:
                self._first_pass_checked = True
                self._check_skips(final=True)
            if reason is not None:
                self._count(reason, key, detail, first_pass)
                self._check_skips()
                continue
            tokens, weighted = self.captions(caption, self.seq_len)
            self._state.seen += 1
            self._last_good_epoch = position[0]
            return key, pixels, tokens, weighted

    # ---------------------------------------------------------------- batches
    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.packing:
            return self._packed_batch()
        from owl_jax.models.splice import plan_micro_batched_slots
        rows, t = self.rows, self.seq_len
        tokens = np.full((rows, t), self.pad_id, np.int64)
        weighted = np.zeros((rows, t), bool)
        segment_ids = np.zeros((rows, t), np.int32)
        images = []
        self.last_batch = []
        for r in range(rows):
            try:
                key, px, tok, w = self._next_usable()
            except StopIteration:
                if not images:
                    raise
                break  # the end of a finite run: the rows left stay padding (module docstring)
            tokens[r, :len(tok)], weighted[r, :len(tok)], segment_ids[r, :len(tok)] = tok, w, 1
            images.append(px)
            self.last_batch.append(CaptionSampleInfo(key, r, 1))
        num_images = (np.arange(rows) < len(images)).astype(np.int64)
        index, pixel_row = plan_micro_batched_slots(tokens, num_images,
                                                    tokens_per_image=self.tokens_per_image,
                                                    image_budget=self.image_budget,
                                                    num_micro_batches=self.micro_batches)
        targets = np.concatenate([tokens[:, 1:], np.full((rows, 1), self.pad_id)], axis=1)
        # Loss at position i predicts token i+1: weighted where the *next* token is a caption/EOS token.
        loss_mask = np.concatenate([weighted[:, 1:], np.zeros((rows, 1), bool)], axis=1)
        positions_ = np.broadcast_to(np.arange(t, dtype=np.int32), (rows, t)).copy()
        return self._finish({"tokens": tokens, "targets": targets, "loss_mask": loss_mask, "positions": positions_,
                             "segment_ids": segment_ids}, images, index, pixel_row)

    def _packed_batch(self) -> dict[str, np.ndarray]:
        """First-fit packing under the per-micro-batch image budget (module docstring)."""
        from data_pipelines.packing import assemble
        from owl_jax.models.splice import plan_micro_batched_slots
        rows, k = self.rows, self.micro_batches
        slots_per_micro_batch = self.image_budget // k
        free, images_in = [self.seq_len] * rows, [0] * k
        rows_of: list[list[int]] = [[] for _ in range(rows)]
        samples: list[dict] = []
        keys: list[str] = []
        while True:
            try:
                sample = self._take()
            except StopIteration:
                if samples:
                    break
                raise
            key, px, tok, w = sample
            row = next((r for r in range(rows) if free[r] >= len(tok) and images_in[r % k] < slots_per_micro_batch),
                       None)
            if row is None:
                if not samples:
                    raise DataError(f"a caption sample of {len(tok)} tokens fits in no row of {self.seq_len}")
                self._held, self._held_state = sample, self._state_before_usable
                break
            free[row] -= len(tok)
            images_in[row % k] += 1
            rows_of[row].append(len(samples))
            keys.append(key)
            # targets[i] = tokens[i+1] of the same sample; `assemble` blanks each segment's last position
            samples.append({"tokens": tok, "targets": np.append(tok[1:], self.pad_id),
                            "loss_mask": np.append(w[1:], False), "images": [px]})
        batch = assemble(samples, rows_of, self.seq_len, self.pad_id, [])
        index, pixel_row = plan_micro_batched_slots(batch.arrays["tokens"], batch.num_images,
                                                    tokens_per_image=self.tokens_per_image,
                                                    image_budget=self.image_budget, num_micro_batches=k)
        self.last_batch = [CaptionSampleInfo(keys[i], row, seg) for i, (row, _, seg) in enumerate(batch.placement)]
        return self._finish(batch.arrays, batch.images, index, pixel_row)

    def _finish(self, arrays: dict[str, np.ndarray], images: list, index: np.ndarray,
                pixel_row: np.ndarray) -> dict[str, np.ndarray]:
        """Normalised pixels in their planned rows, visual-token numbering over the global micro-batch,
        and the batch dtypes."""
        # np.empty: every row is written below (an image or zeros); np.zeros would make the kernel zero
        # fresh pages for each batch first.
        pixels = np.empty((self.image_budget, self.image_size, self.image_size, 3), np.float32)
        for image, row in zip(images, pixel_row):  # normalised in place: no temporary per image
            image_ops.clip_normalize(image, out=pixels[row])
        pixels[np.setdiff1d(np.arange(self.image_budget), pixel_row)] = 0.0  # unused image slots
        # Visual tokens are numbered over the global micro-batch: this process's images follow those of
        # the processes before it (see plan_micro_batched_slots and the train step).
        offset = self._state.process_index * (self.image_budget // self.micro_batches) * self.tokens_per_image
        index = np.where(index >= 0, index + offset, -1).astype(np.int32)
        return {"tokens": arrays["tokens"].astype(np.int32),  # image slots stay negative (embedded as 0)
                "targets": np.maximum(arrays["targets"], 0).astype(np.int32),
                "loss_mask": arrays["loss_mask"].astype(bool), "positions": arrays["positions"].astype(np.int32),
                "segment_ids": arrays["segment_ids"].astype(np.int32), "pixel_values": pixels,
                "image_index": index}

    # ---------------------------------------------------------------- state
    def state(self) -> dict:
        """JSON-serialisable state covering exactly the samples returned so far (a sample held over for
        the next packed batch is not returned yet: the state is from before it)."""
        return dict(self._held_state) if self._held is not None else self._state.to_json()

    def remap_states(self, states: list[dict], num_processes: int | None = None) -> list[dict]:
        """Saved states of an old process count -> states for `num_processes` (default: this pipeline's)."""
        return remap_states(states, num_processes or self._state.num_processes, self.window_size)

    def close(self) -> None:
        # close + join, not terminate: Pool.terminate can deadlock while its task-handler thread is
        # feeding the workers' queue (seen: a test hung in _terminate_pool joining that thread). The
        # workers only finish the few prefetched decodes still queued, then exit.
        if self._pool is not None:
            self._pool.close()
            self._pool.join()
            self._pool = None
        self._results = None
