"""Stage-2 input pipeline: a weighted mixture of instruction sources -> static-shape training batches.

Sources (`InstructionSource`) are json files (one list of records) or jsonl files (one record per line)
in one of the formats of `conversation.READERS` (official, llava — LLaVA-Instruct, LLaVA-Pretrain's
`blip_laion_cc_sbu_558k.json` / `chat.json`, `llava_v1_5_mix665k.json` with its text-only entries —, alpaca,
sharegpt, baize, ...). Image
references are file paths, relative ones resolved against the source's `image_root`, or members of tar
shards written by `make_shards` (`images-00000.tar/000000012.jpg`, see `image_refs`).

Mixture and order (a pure function of the seed, the sources' sizes and their weights)
------------------------------------------------------------------------------------
Weights are given for every source or for none (then weight = the source's record count). With sizes
n_s and weights w_s (W = sum w), a mixture *epoch* is the largest weighted pass:

    L = max_s ceil(n_s * W / w_s)

samples, the fewest in which every source gets at least one full pass at its weight. Source s is drawn
d_s times in the epoch (largest-remainder apportionment of L by w_s, so d_s >= n_s): the source that
sets L makes exactly one pass, the others restart their own permutation when exhausted (sizes-
proportional weights: every record exactly once per epoch). Within the epoch:

- draw j (0 <= j < d_s) of source s reads record perm(seed, epoch, s, cycle)[j mod n_s], cycle = j div n_s:
  each cycle is a fresh permutation (`np.random.default_rng([seed, epoch, crc32(name), cycle, ...])`);
- the draws are interleaved by a stratified random schedule: draw j of s gets the time (j + u)/d_s with u
  uniform in [0, 1) from `default_rng([seed, epoch, crc32(name), ...])`, and the epoch lists all draws
  by time (ties by source order). Any stretch of the order holds each source at its weight to within
  about one sample, and the jitter keeps the interleave aperiodic (a strict round robin would hand all
  of one source to one process when the process count divides its period).

Global sample index g (over all epochs) is position g mod L of epoch g div L. Process p of P considers
the indices g ≡ p (mod P), in increasing order, so the processes split every epoch disjointly and
completely (as `order.py` does for captions).

Batches
-------
Every batch has `rows` rows of `seq_len` tokens and a budget of `image_budget` images per process
(`image_budget / micro_batches` per micro-batch; micro-batch j is rows j, j+k, ... as in
`plan_micro_batched_slots`). Text-only and image samples share batches. Samples are rendered in the conversation template (`template`,
`templates.TEMPLATES`: mplug_owl, plain, vicuna_v1, ...), tokenised and truncated by
`tokenize.to_training_sample` (a sample left without an answer is skipped as `too_long`, one with no trained
token as `no_trained_tokens`: LLaVA's "tokenization mismatch" samples, which train a zero loss there);
a sample with more images than one micro-batch's budget is skipped as `too_many_images`.

Filling a batch tries, in order, the samples carried over from the previous batch and then fresh
samples. Without packing a sample takes the next free row; with packing, the first row with room for
it (first fit, as `packing.pack_batch` places it). A sample that does not fit — no row with room
(packing), or not enough images left in its row's micro-batch — is carried to the next batch, never
dropped; carried samples go first there (oldest first), so each of them eventually lands. The batch
is closed when its rows are full or `rows` samples are being carried. At the end of a finite run
(`epochs`) the last batches may have empty rows.

The output dict mirrors the stage-1 contract (`captions.CaptionPipeline`): tokens, targets, loss_mask,
positions, segment_ids [rows, seq_len] (int32; loss_mask bool), pixel_values [image_budget, S, S, 3]
float32 and image_index [rows, seq_len] int32 from `plan_micro_batched_slots`, offset by this process's
share of the global micro-batch's visual tokens.

State
-----
`state()` is JSON: the next global index this process will consider, the global indices of the samples
carried into the next batch (their data is rebuilt from the sources on restore: reading, tokenising
and augmenting are pure functions of the global index), and the skip / usable counters. Restoring it
replays exactly the batches of the uninterrupted run. A state saved with different sources (names,
sizes, weights) or seed is refused.

Bad data
--------
Malformed json lines (`malformed_json`), records the readers or the tokeniser reject (reason derived
from the `BadRecord` message: `unknown_speaker`, `too_long`, `not_alternating`, ...), missing images
(`missing_image`), undecodable ones (`images.decode_image`'s reasons: `corrupt_image`, ...) and
`too_many_images` are skipped whenever the order reaches them, but counted (by reason, logged with the
source name and record index, and line number for jsonl) once over the run: on the record's first draw,
i.e. in cycle 0 of epoch 0 of its source, where every record is drawn exactly once and by one process
(`skip_counts()`). The counts survive resume and re-splits (they are in the state) and sum over
processes to distinct bad records. More than `max_skip_fraction` bad records among the first draws
(`considered`, counted the same way; checked once at least 200 were considered, and when epoch 0 ends
whatever the count) raises `DataError`. A source without one usable record is an error at construction,
naming it; a stream that yields nothing usable for a whole epoch's worth of samples raises instead of
spinning.

Images are decoded inline (instruction data is mostly text); `decode_images(ImageTask)` is a plain
function of picklable arguments, so a worker pool could run it as `captions.decode_sample` does.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import os
import re
import zlib
from fractions import Fraction
from typing import Any, Optional, Sequence

import numpy as np

from data_pipelines import images as image_ops
from data_pipelines.captions import DataError
from data_pipelines.conversation import READERS, BadRecord, read_record
from data_pipelines.image_refs import image_exists, read_image_bytes
from data_pipelines.packing import pack_batch, pad_batch
from data_pipelines.templates import get_template
from data_pipelines.tokenize import to_training_sample

log = logging.getLogger(__name__)

__all__ = ["DataError", "ImageTask", "InstructionPipeline", "InstructionSource", "SampleInfo", "decode_images",
           "load_records", "reason_key"]

MAX_EPOCH_LENGTH = 50_000_000  # the per-epoch schedule is held in memory (~12 bytes per sample)
MIN_SAMPLES_FOR_SKIP_CHECK = 200
_SCHEDULE_SALT, _PERM_SALT, _AUGMENT_SALT, _VARIANT_SALT = 0x5C4ED, 0x9E4A, 0x1A6E5, 0x7A81A


# ----------------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class InstructionSource:
    """One instruction data file. `format` is a key of `conversation.READERS`; `weight` its share of the
    mixture (None for all sources: proportional to sizes); relative image paths are joined to
    `image_root` (relative to the working directory when `image_root` is empty)."""

    name: str
    path: str
    format: str
    weight: Optional[float] = None
    image_root: str = ""

    def resolve(self, image: str) -> str:
        return image if os.path.isabs(image) or not self.image_root else os.path.join(self.image_root, image)


@dataclasses.dataclass(frozen=True)
class _Malformed:
    """Placeholder for a jsonl line that is not valid json (skipped when the order reaches it)."""
    detail: str


def load_records(source: InstructionSource) -> tuple[list[Any], Optional[list[int]]]:
    """(records, line numbers or None) of a source. `.jsonl`/`.ndjson` files are read line by line
    (blank lines ignored; a malformed line becomes a placeholder record that is skipped and counted
    when reached); `.json` files hold one list; other names are sniffed (a leading `[` means json)."""
    try:
        with open(source.path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DataError(f"instruction source {source.name!r}: cannot read {source.path}: {e}") from None
    lower = source.path.lower()
    is_jsonl = source.format != "cc_sbu_align" and (
        lower.endswith((".jsonl", ".ndjson")) or (not lower.endswith(".json") and not data.lstrip().startswith(b"[")))
    if not is_jsonl:
        try:
            records = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise DataError(f"instruction source {source.name!r}: {source.path} is not valid json: {e}") from None
        if source.format == "cc_sbu_align":  # MiniGPT-4's filter_cap.json: {"annotations": [...]}
            records = records.get("annotations") if isinstance(records, dict) else None
            if not isinstance(records, list):
                raise DataError(f"instruction source {source.name!r}: {source.path} is not a cc_sbu_align file "
                                f"(a json object with an 'annotations' list)")
        if not isinstance(records, list):
            raise DataError(f"instruction source {source.name!r}: {source.path} holds a json "
                            f"{type(records).__name__}, not a list of records")
        return records, None
    records, lines = [], []
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            records.append(json.loads(raw.decode("utf-8")))
        except (UnicodeDecodeError, ValueError) as e:
            records.append(_Malformed(f"{type(e).__name__}: {e}"))
        lines.append(lineno)
    return records, lines


# Short counter keys for BadRecord messages (the full message goes to the log).
_REASONS = (("no trained tokens", "no_trained_tokens"), ("tokenization mismatch", "tokenization_mismatch"),
            ("too long", "too_long"), ("unknown speaker", "unknown_speaker"), ("unknown role", "unknown_role"),
            ("must alternate", "not_alternating"), ("ends with a human turn", "no_answer"),
            ("<image> tags but", "image_count_mismatch"), ("two <image> slots", "adjacent_images"),
            ("<image> in", "misplaced_image_tag"), ("role marker", "role_marker_in_text"),
            ("missing field", "missing_field"), ("lacks 'from'/'value'", "malformed_message"),
            ("plain template takes one image", "not_an_image_caption_pair"),
            ("not an object", "not_an_object"), ("empty", "empty_turn"), ("no turns", "no_turns"))


def reason_key(message: str) -> str:
    """Counter key of a BadRecord message: a known pattern's key, else a slug of the message without
    numbers and quoted values."""
    for pattern, key in _REASONS:
        if pattern in message:
            return key
    slug = re.sub(r"'[^']*'|\"[^\"]*\"|\d+", "", message).lower()
    slug = re.sub(r"[^a-z]+", "_", slug).strip("_")[:48].strip("_")
    return slug or "bad_record"


# ----------------------------------------------------------------------------------------------------
# Image decoding (a pure function of picklable arguments: could run in worker processes)
# ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ImageTask:
    index: int                 # global sample index: seeds the augmentation
    paths: tuple[str, ...]     # resolved image files, in sample order
    image_size: int
    train: bool
    seed: int
    max_pixels: int = image_ops.DEFAULT_MAX_PIXELS
    hflip: bool = True


def decode_images(task: ImageTask) -> list[np.ndarray]:
    """[image_size, image_size, 3] float32 pixels of each image of a sample, or BadSample
    (`missing_image`, `unreadable_image`, or a reason of `images.decode_image`)."""
    out = []
    for k, path in enumerate(task.paths):
        try:
            data = read_image_bytes(path)
        except (FileNotFoundError, NotADirectoryError):
            raise image_ops.BadSample("missing_image", path) from None
        except OSError as e:
            raise image_ops.BadSample("unreadable_image", f"{path}: {e}") from None
        try:
            image = image_ops.decode_image(data, max_pixels=task.max_pixels)
        except image_ops.BadSample as e:
            raise image_ops.BadSample(e.reason, f"{path}: {e}") from None
        rng = np.random.default_rng([task.seed, _AUGMENT_SALT, task.index, k]) if task.train else None
        out.append(image_ops.preprocess(image, task.image_size, train=task.train, rng=rng, hflip=task.hflip))
    return out


# ----------------------------------------------------------------------------------------------------
# Pipeline
# ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Prepared:
    """A usable sample: what `pack_batch` / `pad_batch` read (tokens, targets, loss_mask, images)."""
    index: int
    source: int
    record: int
    tokens: np.ndarray
    targets: np.ndarray
    loss_mask: np.ndarray
    images: list  # pixel arrays, in sample order
    qformer: list = dataclasses.field(default_factory=list)  # per image: its Q-Former instruction ids


@dataclasses.dataclass(frozen=True)
class SampleInfo:
    """Where a sample of the last batch came from and where it went."""
    index: int       # global sample index
    source: str
    record: int      # index in the source's record list
    row: int
    start: int       # first position in the row
    segment: int     # segment id in the row (1 without packing)
    num_images: int


@dataclasses.dataclass
class _State:
    process_index: int
    num_processes: int
    next: int                      # next global index this process considers
    pending: list[int]             # global indices carried into the next batch, in order
    skipped: dict[str, int]
    seen: int                      # usable samples considered
    usable: dict[str, int]         # ... per source
    mixture: dict                  # fingerprint of sources, weights and seed
    exclude: list[int] = dataclasses.field(default_factory=list)  # indices >= next consumed before a remap
    considered: int = 0            # first draws of records taken, usable or not (the skip fraction's total)

    def to_json(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_json(cls, state: dict) -> "_State":
        saved = json.loads(json.dumps(state))
        if "considered" not in saved:  # saved before first-draw counting: the old denominator (usable + bad)
            saved["considered"] = saved.get("seen", 0) + sum(saved.get("skipped", {}).values())
        return cls(**saved)


class InstructionPipeline:
    """Iterator of per-process batches (numpy dicts) for stage-2 training. See the module docstring.

    After each batch, `last_batch` lists its samples (`SampleInfo`: global index, source, record, row,
    segment); `locate(g)` maps a global index to (source number, record index); `epoch_length` and
    `draws` (per source and epoch) describe the mixture.
    """

    def __init__(self, sources: Sequence[InstructionSource], *, tokenizer, seq_len: int, rows: int,
                 image_budget: int, image_size: int, tokens_per_image: int, seed: int = 0, train: bool = True,
                 packing: bool = False, process_index: int = 0, num_processes: int = 1, micro_batches: int = 1,
                 max_skip_fraction: float = 0.1, max_pixels: int = image_ops.DEFAULT_MAX_PIXELS,
                 state: dict | None = None, epochs: Optional[int] = None, hflip: bool = True,
                 system_prompt: Optional[str] = None, template: str = "mplug_owl", qformer_tokenizer=None,
                 qformer_text_len: int = 0):
        self.sources = list(sources)
        if not self.sources:
            raise DataError("no instruction sources")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise DataError(f"instruction source names must be unique: {names}")
        for s in self.sources:
            if s.format not in READERS:
                raise DataError(f"instruction source {s.name!r}: unknown format {s.format!r}; known: {sorted(READERS)}")
        # cc_sbu_align's images (`image/<id>.jpg`) lie beside filter_cap.json unless image_root says otherwise
        self.sources = [dataclasses.replace(s, image_root=os.path.dirname(s.path))
                        if s.format == "cc_sbu_align" and not s.image_root else s for s in self.sources]
        weighted = [s.weight is not None for s in self.sources]
        if any(weighted) and not all(weighted):
            raise DataError("give a weight for every instruction source or for none (then weights follow sizes)")
        if any(s.weight is not None and not s.weight > 0 for s in self.sources):
            raise DataError(f"instruction source weights must be positive: {[s.weight for s in self.sources]}")
        if micro_batches < 1 or rows % micro_batches or image_budget % micro_batches or image_budget < micro_batches:
            raise DataError(f"{rows} rows and {image_budget} image slots per process must split into "
                            f"{micro_batches} micro-batches, with at least one image slot each")
        if not 0 <= process_index < num_processes:
            raise DataError(f"process_index {process_index} is not in [0, {num_processes})")
        self.tokenizer, self.seq_len, self.rows, self.image_budget = tokenizer, seq_len, rows, image_budget
        self.image_size, self.tokens_per_image, self.micro_batches = image_size, tokens_per_image, micro_batches
        self.seed, self.train, self.packing, self.epochs = seed, train, packing, epochs
        self.hflip = hflip
        # InstructBLIP: each image's instruction, tokenised for the Q-Former (`qformer_tokens`)
        self.qformer_tokenizer, self.qformer_text_len = qformer_tokenizer, qformer_text_len
        if qformer_tokenizer is not None and qformer_text_len < 1:
            raise DataError(f"qformer_text_len must be positive with a Q-Former tokenizer, got {qformer_text_len}")
        try:
            self.template = get_template(template)
        except ValueError as e:
            raise DataError(str(e)) from None
        if system_prompt is not None:
            try:
                self.template.check_system(system_prompt)
            except BadRecord as e:
                raise DataError(f"system_prompt {system_prompt!r}: {e.reason}") from None
        self.system_prompt = system_prompt
        self.max_skip_fraction, self.max_pixels = max_skip_fraction, max_pixels
        self.images_per_micro_batch = image_budget // micro_batches
        self.max_carry = rows

        loaded = [load_records(s) for s in self.sources]
        self._records = [r for r, _ in loaded]
        self._lines = [l for _, l in loaded]
        self._keys = [zlib.crc32(s.name.encode("utf-8")) for s in self.sources]
        for i, s in enumerate(self.sources):
            self._check_usable(i)
        self.epoch_length, self.draws = self._apportion()
        self._schedules: collections.OrderedDict = collections.OrderedDict()
        self._perms: collections.OrderedDict = collections.OrderedDict()

        fingerprint = {"seed": seed, "sources": [[s.name, len(r), None if s.weight is None else repr(float(s.weight))]
                                                 for s, r in zip(self.sources, self._records)]}
        if state is None:
            self._state = _State(process_index, num_processes, process_index, [], {}, 0,
                                 {s.name: 0 for s in self.sources}, fingerprint)
        else:
            try:
                self._state = _State.from_json(state)
            except TypeError as e:
                raise DataError(f"not an InstructionPipeline state: {e}") from None
            if (self._state.process_index, self._state.num_processes) != (process_index, num_processes):
                raise DataError(f"iterator state is for process {self._state.process_index} of "
                                f"{self._state.num_processes}, not {process_index} of {num_processes}")
            if self._state.mixture != fingerprint:
                raise DataError(f"iterator state was saved for another mixture ({self._state.mixture}), not "
                                f"{fingerprint}; the order would differ")
        self._pending: Optional[list[_Prepared]] = None  # materialised from state.pending on first use
        self._bad_streak = 0
        self._examples: dict[str, str] = {}  # reason -> the first record skipped for it (for errors)
        self._first_pass_checked = False  # the skip fraction of all of epoch 0 was checked
        self.last_batch: list[SampleInfo] = []

    # ---------------------------------------------------------------- mixture and order
    def _apportion(self) -> tuple[int, list[int]]:
        sizes = [len(r) for r in self._records]
        w = [Fraction(n) if s.weight is None else Fraction(s.weight) for s, n in zip(self.sources, sizes)]
        total = sum(w)
        length = max(math.ceil(n * total / ws) for n, ws in zip(sizes, w))
        if length > MAX_EPOCH_LENGTH:
            raise DataError(f"the mixture epoch would be {length} samples (weights {[float(x) for x in w]} for "
                            f"sizes {sizes}); a tiny weight on a large source makes every other source repeat "
                            f"very often per epoch: raise that weight")
        quotas = [length * ws / total for ws in w]
        draws = [math.floor(q) for q in quotas]
        by_remainder = sorted(range(len(w)), key=lambda s: (-(quotas[s] - draws[s]), s))
        for s in by_remainder[:length - sum(draws)]:
            draws[s] += 1
        return length, draws

    def _schedule(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, draw number) at each position of `epoch`."""
        if epoch not in self._schedules:
            times, srcs, nums = [], [], []
            for s, d in enumerate(self.draws):
                u = np.random.default_rng([self.seed, epoch, self._keys[s], _SCHEDULE_SALT]).random(d)
                times.append((np.arange(d) + u) / d)
                srcs.append(np.full(d, s, np.int32))
                nums.append(np.arange(d, dtype=np.int64))
            src, num = np.concatenate(srcs), np.concatenate(nums)
            order = np.lexsort((src, np.concatenate(times)))
            self._schedules[epoch] = (src[order], num[order])
            while len(self._schedules) > 2:
                self._schedules.popitem(last=False)
        self._schedules.move_to_end(epoch)
        return self._schedules[epoch]

    def _perm(self, epoch: int, source: int, cycle: int) -> np.ndarray:
        key = (epoch, source, cycle)
        if key not in self._perms:
            rng = np.random.default_rng([self.seed, epoch, self._keys[source], cycle, _PERM_SALT])
            self._perms[key] = rng.permutation(len(self._records[source]))
            while len(self._perms) > 16:
                self._perms.popitem(last=False)
        self._perms.move_to_end(key)
        return self._perms[key]

    def locate(self, index: int) -> tuple[int, int]:
        """(source number, record index) of global sample `index`."""
        epoch, k = divmod(index, self.epoch_length)
        src, num = self._schedule(epoch)
        s, j = int(src[k]), int(num[k])
        cycle, m = divmod(j, len(self._records[s]))
        return s, int(self._perm(epoch, s, cycle)[m])

    # ---------------------------------------------------------------- samples
    def _where(self, source: int, record: int) -> str:
        lines = self._lines[source]
        return f"{self.sources[source].name}[{record}]" + (f" (line {lines[record]})" if lines else "")

    def _variant(self, index: Optional[int]) -> int:
        """Which generated instruction sample `index` gets (cc_sbu_align's random align prompt): a pure
        function of the seed and the index, so a resumed or re-run pipeline draws the same."""
        if index is None:
            return 0
        return int(np.random.default_rng([self.seed, _VARIANT_SALT, index]).integers(1 << 30))

    def _conversation(self, source: int, record: int, index: Optional[int] = None):
        """The record's Conversation in the pipeline's template (BadRecord when it has none)."""
        src, rec = self.sources[source], self._records[source][record]
        template = self.template
        return template.with_system(read_record(rec, src.format, markers=template.markers,
                                                variant=self._variant(index)), self.system_prompt)

    def _text(self, source: int, record: int, index: Optional[int] = None):
        """TrainingSample of a record, or BadSample (reader, tokeniser and image-count checks)."""
        rec = self._records[source][record]
        if isinstance(rec, _Malformed):
            raise image_ops.BadSample("malformed_json", rec.detail)
        template = self.template
        try:
            conv = self._conversation(source, record, index)
            sample = to_training_sample(conv, self.tokenizer, self.seq_len, self.tokens_per_image, template=template)
        except BadRecord as e:
            raise image_ops.BadSample(reason_key(e.reason), e.reason) from None
        if not sample.loss_mask.any():  # (to_training_sample refuses these already; never train a zero loss)
            raise image_ops.BadSample("no_trained_tokens", "the sample has no trained token")
        if sample.num_images > self.images_per_micro_batch:
            raise image_ops.BadSample("too_many_images", f"{sample.num_images} images, budget "
                                      f"{self.images_per_micro_batch} per micro-batch")
        return sample

    def _check_usable(self, source: int) -> None:
        """Construction check: some record reads, fits and has its image files (stops at the first)."""
        src, reasons = self.sources[source], collections.Counter()
        for r in range(len(self._records[source])):
            try:
                sample = self._text(source, r)
            except image_ops.BadSample as e:
                reasons[e.reason] += 1
                continue
            if all(image_exists(src.resolve(p)) for p in sample.images):
                return
            reasons["missing_image"] += 1
        raise DataError(f"instruction source {src.name!r} ({src.path}) has no usable record among "
                        f"{len(self._records[source])} ({dict(reasons)})")

    def _prepare(self, index: int) -> _Prepared:
        source, record = self.locate(index)
        sample = self._text(source, record, index)
        task = ImageTask(index, tuple(self.sources[source].resolve(p) for p in sample.images), self.image_size,
                         self.train, self.seed, self.max_pixels, self.hflip)
        pixels = decode_images(task)
        qformer = []
        if self.qformer_tokenizer is not None:
            texts = self.template.image_instructions(self._conversation(source, record, index))[:len(pixels)]
            qformer = [np.asarray(self.qformer_tokenizer.encode(t)[:self.qformer_text_len], np.int32) for t in texts]
        return _Prepared(index, source, record, sample.tokens, sample.targets, sample.loss_mask, pixels, qformer)

    def first_draw(self, index: int) -> bool:
        """Whether global sample `index` is its record's first draw in the run (epoch 0, cycle 0 of its
        source: each record exactly once)."""
        epoch, k = divmod(index, self.epoch_length)
        if epoch:
            return False
        src, num = self._schedule(0)
        return int(num[k]) < len(self._records[int(src[k])])

    def _count(self, reason: str, index: int, detail: str) -> None:
        """Count a skipped record on its first draw only (module docstring) and log it."""
        source, record = self.locate(index)
        where = self._where(source, record)
        if not self.first_draw(index):
            log.debug("skipping instruction record %s again, sample %d (%s): %s", where, index, reason, detail)
            return
        self._state.skipped[reason] = self._state.skipped.get(reason, 0) + 1
        self._examples.setdefault(reason, f"{where}: {detail}")
        log.warning("skipping instruction record %s, sample %d (%s): %s", where, index, reason, detail)

    def skip_counts(self) -> dict[str, int]:
        """{reason: distinct bad records skipped so far by this process}."""
        return dict(self._state.skipped)

    def _skip_summary(self) -> str:
        examples = "; ".join(f"{reason}: {self._examples[reason]}" for reason in list(self._examples)[:4])
        return f"{dict(self._state.skipped)}" + (f"; e.g. {examples}" if examples else "")

    def _check_skips(self, final: bool = False) -> None:
        """DataError above max_skip_fraction bad first draws: from 200 considered on, and at the end of
        epoch 0 (`final`) whatever the count."""
        bad = sum(self._state.skipped.values())
        total = self._state.considered
        if (total >= MIN_SAMPLES_FOR_SKIP_CHECK or (final and total)) and bad > self.max_skip_fraction * total:
            raise DataError(f"{bad} of {total} instruction samples were unusable ({self._skip_summary()}), "
                            f"more than data.max_skip_fraction={self.max_skip_fraction}; fix the data or raise "
                            f"the limit")

    def _fresh(self) -> Optional[_Prepared]:
        """The next usable sample of this process's share of the order, or None at the end of the run."""
        st = self._state
        while True:
            index = st.next
            if self.epochs is not None and index >= self.epochs * self.epoch_length:
                return None
            st.next += st.num_processes
            if st.exclude and index in st.exclude:  # consumed by another process before a remap
                st.exclude.remove(index)
                continue
            if index >= self.epoch_length and not self._first_pass_checked:
                self._first_pass_checked = True
                self._check_skips(final=True)
            first = self.first_draw(index)
            st.considered += first
            try:
                sample = self._prepare(index)
            except image_ops.BadSample as e:
                self._count(e.reason, index, str(e).removeprefix(e.reason).removeprefix(": "))
                self._check_skips()
                self._bad_streak += 1
                if self._bad_streak >= max(self.epoch_length, MIN_SAMPLES_FOR_SKIP_CHECK):
                    raise DataError(f"{self._bad_streak} instruction samples in a row without a usable one "
                                    f"({self._skip_summary()})") from None
                continue
            self._bad_streak = 0
            st.seen += 1
            name = self.sources[sample.source].name
            st.usable[name] = st.usable.get(name, 0) + 1
            return sample

    def _carried(self) -> list[_Prepared]:
        if self._pending is None:
            self._pending = []
            for index in self._state.pending:  # rebuilt exactly: a pure function of the index
                try:
                    self._pending.append(self._prepare(index))
                except image_ops.BadSample as e:  # the data changed since the state was saved
                    self._count(e.reason, index, f"{e} (carried sample, on restore)")  # (already considered)
        return self._pending

    # ---------------------------------------------------------------- batches
    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        from owl_jax.models.splice import plan_micro_batched_slots
        rows, k = self.rows, self.micro_batches
        free = [self.seq_len] * rows
        images = [0] * k
        placed: list[_Prepared] = []
        carried: list[_Prepared] = []

        def offer(p: _Prepared) -> None:
            n = len(p.tokens)
            if self.packing:
                row = next((r for r in range(rows) if free[r] >= n), None)
            else:
                row = len(placed) if len(placed) < rows else None
            if row is None or images[row % k] + len(p.images) > self.images_per_micro_batch:
                carried.append(p)
                return
            free[row] -= n
            images[row % k] += len(p.images)
            placed.append(p)

        def full() -> bool:
            return not any(free) if self.packing else len(placed) == rows

        for p in self._carried():
            offer(p)
        while not full() and len(carried) < self.max_carry:
            p = self._fresh()
            if p is None:
                break
            offer(p)
        if not placed:
            self._pending, self._state.pending = carried, [p.index for p in carried]
            raise StopIteration
        batch = (pack_batch(placed, self.seq_len, rows, pad_id=self.tokenizer.pad_id) if self.packing
                 else pad_batch(placed, self.seq_len, rows=rows, pad_id=self.tokenizer.pad_id))
        assert not batch.leftover, "pack_batch placed differently from the batch filler"
        self._pending, self._state.pending = carried, [p.index for p in carried]

        index, pixel_row = plan_micro_batched_slots(batch.arrays["tokens"], batch.num_images,
                                                    tokens_per_image=self.tokens_per_image,
                                                    image_budget=self.image_budget, num_micro_batches=k)
        pixels = np.zeros((self.image_budget, self.image_size, self.image_size, 3), np.float32)
        if batch.images:
            pixels[pixel_row] = np.stack(batch.images)
        # Visual tokens are numbered over the global micro-batch: this process's images follow those of
        # the processes before it (as in captions.CaptionPipeline and the train step).
        offset = self._state.process_index * self.images_per_micro_batch * self.tokens_per_image
        index = np.where(index >= 0, index + offset, -1).astype(np.int32)
        self.last_batch = [SampleInfo(p.index, self.sources[p.source].name, p.record, row, start, seg, len(p.images))
                           for p, (row, start, seg) in zip(placed, batch.placement)]
        a = batch.arrays
        out = {"tokens": a["tokens"], "targets": a["targets"], "loss_mask": a["loss_mask"],
               "positions": a["positions"], "segment_ids": a["segment_ids"], "pixel_values": pixels,
               "image_index": index}
        if self.qformer_tokenizer is not None:  # one row per image slot, as pixel_values; padded with -1
            qformer = np.full((self.image_budget, self.qformer_text_len), -1, np.int32)
            order = sorted(range(len(placed)), key=lambda i: batch.placement[i][:2])  # batch.images' order
            for slot, ids in zip(pixel_row, [q for i in order for q in placed[i].qformer]):
                qformer[slot, :len(ids)] = ids
            out["qformer_tokens"] = qformer
        return out

    # ---------------------------------------------------------------- state
    def state(self) -> dict:
        """JSON-serialisable state covering exactly the batches returned so far."""
        return self._state.to_json()

    def remap_states(self, states: list[dict], num_processes: int | None = None) -> list[dict]:
        """The saved states of all P processes of a run -> states for `num_processes` (Q) processes that
        continue it with no sample twice and none skipped. Old process p had considered every index
        ≡ p (mod P) below its `next`; from M = min(next) on, new process q considers the indices ≡ q
        (mod Q), excluding those some old process already considered. Samples carried by old processes
        are dealt out to the new ones (round robin) and open their first batches; the skip, usable and
        considered counters move to process 0. The continuation is a valid order, not the order a
        Q-process run from the start would have had."""
        q_count = num_processes or self._state.num_processes
        old = [_State.from_json(st) for st in states]
        p_count = len(old)
        if sorted(st.process_index for st in old) != list(range(p_count)) or any(
                st.num_processes != p_count for st in old):
            raise DataError(f"need the states of all processes 0..{p_count - 1} of one run to re-split")
        if any(st.mixture != old[0].mixture for st in old):
            raise DataError("the saved states come from different mixtures")
        old.sort(key=lambda st: st.process_index)
        start = min(st.next for st in old)
        considered: set[int] = set()
        for st in old:  # indices >= start already considered: p's own, and those p was told to skip
            considered.update(range(start + (st.process_index - start) % p_count, st.next, p_count))
            considered.update(st.exclude)
        carried = [g for st in old for g in st.pending]
        skipped: dict[str, int] = collections.Counter()
        usable: dict[str, int] = collections.Counter()
        for st in old:
            skipped.update(st.skipped)
            usable.update(st.usable)
        new = []
        for q in range(q_count):
            first = start + (q - start) % q_count
            new.append(_State(q, q_count, first, carried[q::q_count],
                              dict(skipped) if q == 0 else {}, sum(st.seen for st in old) if q == 0 else 0,
                              {k: (usable.get(k, 0) if q == 0 else 0) for k in old[0].usable}, old[0].mixture,
                              sorted(g for g in considered if g % q_count == q % q_count),
                              considered=sum(st.considered for st in old) if q == 0 else 0).to_json())
        return new

    def close(self) -> None:
        """Nothing to release (decoding is inline); for symmetry with CaptionPipeline."""
