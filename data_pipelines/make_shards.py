"""`python -m data_pipelines.make_shards`: loose files -> the shards the input pipelines read.

    captions      IMAGE_DIR + a captions table (csv, jsonl or parquet: one row per image, a file-name
                  column and a caption column) -> webdataset caption shards exactly as img2dataset
                  writes them (`{key}.jpg|png|webp` + `{key}.txt` + `{key}.json`), for `CaptionPipeline`
                  (`data.train_paths`).
    instructions  an instruction json/jsonl in any format of `conversation.READERS` + its image root ->
                  the same records as jsonl, with every image stored once in tar shards and referenced
                  as `images-00000.tar/000000012.jpg` (read by `InstructionPipeline` through
                  `image_refs`; `image_root` = the output folder).

Why: a training run must not discover at step 40,000 that a caption file points at missing pictures.
Every row is checked here (the image decodes, the caption is there, the record reads) and every bad one
is counted by reason, logged with its row or record number, and reported at the end, never silently
dropped; `--max-skip-fraction` (default 0.1; 1 accepts anything) turns a mostly-broken input (wrong
image folder, wrong column) into an error (exit 1). Images above `--max-pixels` are refused as
`decompression_bomb`. Image bytes are copied unchanged when they are JPEG, PNG or WebP (no generation
loss) unless `--image-format` asks for one format; anything else (BMP, TIFF, GIF, ...) is re-encoded as
JPEG. Keys are the input row / image numbers, so a key leads back to its row.

The output folder is checked before any work (a file in its path, no write permission: one line, exit
2). A folder that is not empty is refused (exit 2): new shards next to old ones would be read as one set
(`out/*.tar`, or a brace pattern reaching an old higher-numbered shard). `--force` writes there anyway
and first removes what the new set replaces: the shards of its own pattern (`PREFIX<number>.tar`, any
number), its records file (instructions) and its `*_stats.json`; other files are left alone.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import csv
import dataclasses
import json
import logging
import math
import multiprocessing
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any


from data_pipelines import images as image_ops
from data_pipelines.conversation import READERS, BadRecord, read_record
from data_pipelines.image_refs import read_image_bytes, split_tar_ref
from data_pipelines.instructions import (
    DataError,
    InstructionSource,
    load_records,
    reason_key,
)
from data_pipelines.writer import ShardWriter, encode_image

log = logging.getLogger("data_pipelines.make_shards")

IMAGE_COLUMNS = ("image", "file_name", "filename", "file", "path", "image_path")
CAPTION_COLUMNS = ("caption", "text")
KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
MIN_ROWS_FOR_SKIP_CHECK = 200
EXAMPLES_PER_REASON = 3
DEFAULT_MAX_SKIP_FRACTION = 0.1


class MakeShardsError(RuntimeError):
    """The input cannot be converted (unknown column, unreadable table, too many bad rows); `report` is
    what was written and counted up to then, when anything was."""

    def __init__(self, message: str, report: Report | None = None):
        super().__init__(message)
        self.report = report


class OutputError(MakeShardsError):
    """--out cannot take the new shards (not a writable folder, or not empty without --force): exit 2,
    raised before any work."""


def _owned_files(prefix: str, extra: Sequence[str]) -> re.Pattern:
    """The file names a new set writes (and so replaces): its numbered shards and `extra` names."""
    names = "|".join(re.escape(n) for n in extra)
    return re.compile(rf"{re.escape(prefix)}\d+\.tar" + (f"|{names}" if names else ""))


def check_output(out_dir: str, force: bool) -> None:
    """The first thing a conversion does (no input read yet, nothing created): OutputError when a file
    sits where a folder must be, the folder (or the nearest existing folder above it) cannot be written,
    or it is not empty and `force` is off."""
    from owl_jax.paths import OutputPathError, check_writable_dir, nearest_existing
    try:
        check_writable_dir(out_dir, "--out", create=False)
    except OutputPathError as e:
        raise OutputError(str(e)) from None
    entries = sorted(os.listdir(out_dir)) if nearest_existing(out_dir) == Path(os.path.abspath(out_dir)) else []
    if entries and not force:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise OutputError(f"--out {out_dir} is not empty ({len(entries)} entries: {shown}); choose an empty "
                          f"folder, or pass --force to replace the shards of this set there")


def prepare_output(out_dir: str, owned: re.Pattern) -> list[str]:
    """Create `out_dir` once the inputs are known to be readable, and remove the regular files whose names
    `owned` matches (the old files of the set being written; only reached with --force when there are
    any, see `check_output`). Returns the names removed."""
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise OutputError(f"--out {out_dir}: cannot create it ({e.strerror or e})") from None
    removed = [name for name in sorted(os.listdir(out_dir)) if owned.fullmatch(name)]
    for name in removed:
        target = os.path.join(out_dir, name)
        if not os.path.isfile(target) or os.path.islink(target):
            raise OutputError(f"--out {out_dir}: {name} is not a regular file; remove it yourself")
        try:
            os.remove(target)
        except OSError as e:
            raise OutputError(f"--out {out_dir}: cannot remove the old {name} ({e.strerror or e})") from None
    if removed:
        log.warning("--force: removed %d old file(s) of this set from %s", len(removed), out_dir)
    return removed


# ----------------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Report:
    """What a conversion wrote and what it skipped (by reason, with a few example rows each)."""
    kind: str
    shards: list[str] = dataclasses.field(default_factory=list)
    samples: int = 0   # caption samples, or instruction records written
    images: int = 0    # images stored
    considered: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    outputs: list[str] = dataclasses.field(default_factory=list)  # jsonl files written (instructions)
    seconds: float = 0.0

    def skip(self, reason: str, where: str, detail: str) -> None:
        self.skipped[reason] += 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < EXAMPLES_PER_REASON:
            examples.append(f"{where}: {detail}" if detail else where)
        log.warning("skipping %s (%s): %s", where, reason, detail)

    def check(self, max_skip_fraction: float | None, final: bool = False) -> None:
        """MakeShardsError when more than `max_skip_fraction` of the rows so far were bad (checked from
        200 rows on, and at the end whatever the count)."""
        bad = sum(self.skipped.values())
        if max_skip_fraction is None or not self.considered:
            return
        if (final or self.considered >= MIN_ROWS_FOR_SKIP_CHECK) and bad > max_skip_fraction * self.considered:
            raise MakeShardsError(f"{bad} of {self.considered} rows were unusable ({dict(self.skipped)}), more "
                                  f"than --max-skip-fraction={max_skip_fraction}; check the image folder and "
                                  f"the column names (or raise the limit, with --force to replace what was "
                                  f"written)", self)

    def to_json(self) -> dict:
        return {"kind": self.kind, "shards": self.shards, "samples": self.samples, "images": self.images,
                "considered": self.considered, "skipped": dict(self.skipped), "examples": self.examples,
                "outputs": self.outputs, "seconds": round(self.seconds, 3)}

    def summary(self) -> str:
        what = "samples" if self.kind == "captions" else "records"
        head = (f"{self.kind}: wrote {self.samples} {what} and {self.images} images in {len(self.shards)} "
                f"shard(s) ({self.seconds:.1f}s)")
        lines = [head]
        if self.shards:
            lines.append(f"  shards: {shard_pattern(self.shards)}")
        lines += [f"  records: {path}" for path in self.outputs]
        bad = sum(self.skipped.values())
        unit = "rows" if self.kind == "captions" else "records"
        lines.append(f"  skipped {bad} of {self.considered} {unit}" + (":" if bad else ""))
        for reason, count in self.skipped.most_common():
            lines.append(f"    {reason:<24} {count:>8}   e.g. {'; '.join(self.examples.get(reason, []))}")
        return "\n".join(lines)


def shard_pattern(paths: Sequence[str]) -> str:
    """A brace pattern covering numbered shard paths (`out/{00000..00012}.tar`), as the configs take."""
    if len(paths) <= 1:
        return paths[0] if paths else ""
    first, last = paths[0], paths[-1]
    i = 0
    while i < len(first) and first[i] == last[i]:
        i += 1
    while i and first[i - 1].isdigit():
        i -= 1
    j = i
    while j < len(first) and first[j].isdigit():
        j += 1
    return f"{first[:i]}{{{first[i:j]}..{last[i:j]}}}{first[j:]}"


# ----------------------------------------------------------------------------------------------------
# Images (a pure function of picklable arguments: runs in worker processes)
# ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ImageJob:
    index: int         # row / image number (the result's identity)
    path: str
    image_format: str  # "keep" | "jpg" | "png" | "webp"
    max_pixels: int = image_ops.DEFAULT_MAX_PIXELS


@dataclasses.dataclass(frozen=True)
class LoadedImage:
    index: int
    data: bytes = b""
    ext: str = ""
    width: int = 0
    height: int = 0
    reason: str = ""   # non-empty: unusable
    detail: str = ""


def load_image(job: ImageJob) -> LoadedImage:
    """Read, check (decodes completely, not a bomb) and, if needed, re-encode one image file."""
    try:
        try:
            data = read_image_bytes(job.path)
        except (FileNotFoundError, NotADirectoryError):
            raise image_ops.BadSample("missing_image", job.path) from None
        except IsADirectoryError:
            raise image_ops.BadSample("missing_image", f"{job.path} is a directory") from None
        except OSError as e:
            raise image_ops.BadSample("unreadable_image", f"{job.path}: {e}") from None
        image = image_ops.decode_image(data, max_pixels=job.max_pixels)
        found = KEPT_FORMATS.get(image_ops.image_format(data, max_pixels=job.max_pixels) or "")
        wanted = found if job.image_format == "keep" else job.image_format
        if wanted is None:
            wanted = "jpg"
        if wanted != found:
            data = encode_image(image, wanted)
        return LoadedImage(job.index, data, wanted, image.size[0], image.size[1])
    except image_ops.BadSample as e:
        detail = str(e).removeprefix(e.reason).removeprefix(": ")
        if job.path not in detail:
            detail = f"{job.path}: {detail}" if detail else job.path
        return LoadedImage(job.index, reason=e.reason, detail=detail)


@contextlib.contextmanager
def image_loader(workers: int) -> Iterator[Callable[[Sequence[ImageJob]], Iterator[LoadedImage]]]:
    """A function running `load_image` over a list of jobs, in order: inline, or in `workers` spawned
    processes (> 1). Callers read rows and do all accounting in the main process; only the image work
    (reading, decoding, re-encoding) is farmed out."""
    if workers <= 1:
        yield lambda jobs: map(load_image, jobs)
        return
    pool = multiprocessing.get_context("spawn").Pool(workers)
    try:
        yield lambda jobs: pool.imap(load_image, jobs, chunksize=max(1, min(16, len(jobs) // (4 * workers))))
    finally:
        pool.terminate()


def _blocks(items: Iterable, size: int) -> Iterator[list]:
    block: list = []
    for item in items:
        block.append(item)
        if len(block) == size:
            yield block
            block = []
    if block:
        yield block


# ----------------------------------------------------------------------------------------------------
# Caption tables
# ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _BadRow:
    detail: str


def table_format(path: str, fmt: str | None = None) -> str:
    if fmt:
        return fmt
    suffix = Path(path).suffix.lower()
    known = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl",
             ".parquet": "parquet", ".pq": "parquet"}
    if suffix not in known:
        raise MakeShardsError(f"cannot tell the format of {path} from its name; pass --table-format "
                              f"csv|tsv|jsonl|parquet")
    return known[suffix]


def read_table(path: str, fmt: str) -> tuple[list[str] | None, Iterator[Any]]:
    """(column names, or None when only the rows tell (jsonl); rows as dicts or _BadRow)."""
    if fmt in ("csv", "tsv"):
        delimiter = "\t" if fmt == "tsv" else ","
        try:
            with open(path, newline="", encoding="utf-8-sig") as f:
                columns = list(csv.DictReader(f, delimiter=delimiter).fieldnames or [])
        except (UnicodeDecodeError, csv.Error) as e:
            raise MakeShardsError(f"{path} is not a UTF-8 {fmt} file: {e}") from None

        def rows() -> Iterator[Any]:
            with open(path, newline="", encoding="utf-8-sig") as f:
                reader = csv.DictReader(f, delimiter=delimiter)
                try:
                    yield from reader
                except (UnicodeDecodeError, csv.Error) as e:
                    raise MakeShardsError(f"{path}: unreadable {fmt} after line {reader.line_num}: {e}") from None
        return columns, rows()
    if fmt == "jsonl":
        def rows() -> Iterator[Any]:
            with open(path, "rb") as f:
                for raw in f:
                    if not raw.strip():
                        continue
                    try:
                        row = json.loads(raw.decode("utf-8"))
                    except (UnicodeDecodeError, ValueError) as e:
                        yield _BadRow(f"{type(e).__name__}: {e}")
                        continue
                    yield row if isinstance(row, dict) else _BadRow(f"a json {type(row).__name__}, not an object")
        return None, rows()
    if fmt == "parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise MakeShardsError("reading parquet needs pyarrow: pip install pyarrow (or convert the table "
                                  "to csv / jsonl)") from None
        try:
            table = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as e:
            raise MakeShardsError(f"{path} is not a readable parquet file: {e}") from None
        columns = list(table.schema_arrow.names)

        def rows() -> Iterator[Any]:
            for batch in table.iter_batches(batch_size=4096):
                yield from batch.to_pylist()
        return columns, rows()
    raise MakeShardsError(f"unknown table format {fmt!r} (csv, tsv, jsonl, parquet)")


def _pick_column(columns: Sequence[str], given: str | None, candidates: Sequence[str], what: str,
                 flag: str, path: str) -> str:
    if given is not None:
        if given not in columns:
            raise MakeShardsError(f"unknown {what} column {given!r} in {path}; its columns are {list(columns)}")
        return given
    for name in candidates:
        if name in columns:
            return name
    raise MakeShardsError(f"no {what} column in {path} (looked for {list(candidates)}); its columns are "
                          f"{list(columns)}: pass {flag}")


def _caption_of(value: Any) -> tuple[str | None, str]:
    """(caption, bad reason)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None, "missing_caption"
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return None, "non_utf8_caption"
    if not isinstance(value, str):
        if isinstance(value, (int, float)):
            value = str(value)
        else:
            return None, "bad_caption_type"
    value = value.strip()
    return (value, "") if value else (None, "empty_caption")


def _json_safe(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return str(value)


@dataclasses.dataclass(frozen=True)
class _CaptionRow:
    index: int
    key: str
    image: str      # as given in the table
    caption: str
    extra: dict


def make_caption_shards(table: str, image_dir: str, out_dir: str, *, image_column: str | None = None,
                        caption_column: str | None = None, table_format_: str | None = None,
                        samples_per_shard: int = 1000, prefix: str = "", image_format: str = "keep",
                        workers: int = 1, max_skip_fraction: float | None = None,
                        max_pixels: int = image_ops.DEFAULT_MAX_PIXELS, force: bool = False) -> Report:
    """Caption table + image folder -> `out_dir/{prefix}%05d.tar` caption shards. Image file names in the
    table are relative to `image_dir` (absolute ones are kept). `out_dir` is checked first
    (`check_output`); with `force`, the set's old files there are removed once the inputs are known to be
    readable (`prepare_output`)."""
    t0 = time.perf_counter()
    if image_format not in ("keep", "jpg", "png", "webp"):
        raise MakeShardsError(f"--image-format must be keep, jpg, png or webp, not {image_format!r}")
    check_output(out_dir, force)
    if not os.path.isdir(image_dir):
        raise MakeShardsError(f"image folder {image_dir} does not exist")
    if not os.path.isfile(table):
        raise MakeShardsError(f"captions table {table} does not exist")
    fmt = table_format(table, table_format_)
    columns, rows = read_table(table, fmt)
    report = Report("captions")
    cols: dict[str, str] = {}
    if columns is not None:
        cols["image"] = _pick_column(columns, image_column, IMAGE_COLUMNS, "image", "--image-column", table)
        cols["caption"] = _pick_column(columns, caption_column, CAPTION_COLUMNS, "caption", "--caption-column", table)
    prepare_output(out_dir, _owned_files(prefix, ["captions_stats.json"]))

    def usable(index: int, row: Any) -> _CaptionRow | None:
        """The row's caption sample, or None (counted) when the row itself is bad."""
        where = f"row {index}"
        if isinstance(row, _BadRow):
            report.skip("malformed_row", where, row.detail)
            return None
        if not cols:  # jsonl: the first readable row names the columns
            keys = list(row)
            cols["image"] = _pick_column(keys, image_column, IMAGE_COLUMNS, "image", "--image-column",
                                         f"{table} (first row)")
            cols["caption"] = _pick_column(keys, caption_column, CAPTION_COLUMNS, "caption", "--caption-column",
                                           f"{table} (first row)")
        name = row.get(cols["image"])
        if not isinstance(name, str) or not name.strip():
            report.skip("no_image_name", where, f"{cols['image']}={name!r}")
            return None
        caption, reason = _caption_of(row.get(cols["caption"]))
        if caption is None:
            report.skip(reason, where, f"{name}: {cols['caption']}={row.get(cols['caption'])!r}")
            return None
        extra = {k: _json_safe(v) for k, v in row.items() if k not in cols.values()}
        return _CaptionRow(index, f"{index:09d}", name.strip(), caption, extra)

    writer = ShardWriter(os.path.join(out_dir, f"{prefix}%05d.tar"), samples_per_shard)
    try:
        with image_loader(workers) as load:
            for block in _blocks(enumerate(rows), 64 * max(workers, 1)):
                report.considered += len(block)
                samples = [s for s in (usable(i, row) for i, row in block) if s is not None]
                jobs = [ImageJob(s.index, os.path.join(image_dir, s.image), image_format, max_pixels)
                        for s in samples]
                for s, loaded in zip(samples, load(jobs)):
                    if loaded.reason:
                        report.skip(loaded.reason, f"row {s.index}", loaded.detail)
                        continue
                    meta = {"key": s.key, "caption": s.caption, "image": s.image, "width": loaded.width,
                            "height": loaded.height, **s.extra}
                    writer.write(s.key, {loaded.ext: loaded.data, "txt": s.caption.encode("utf-8"),
                                         "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")})
                    report.samples += 1
                    report.images += 1
                report.check(max_skip_fraction)
    finally:
        writer.close()
        report.shards = list(writer.paths)
        report.seconds = time.perf_counter() - t0
    report.check(max_skip_fraction, final=True)
    return report


# ----------------------------------------------------------------------------------------------------
# Instruction data
# ----------------------------------------------------------------------------------------------------

def _in_owned_shard(path: str, out_dir: str, owned: re.Pattern) -> bool:
    """Whether image `path` is a member of a tar in `out_dir` whose name `owned` matches."""
    ref = split_tar_ref(path)
    return (ref is not None and os.path.dirname(os.path.abspath(ref[0])) == os.path.abspath(out_dir)
            and owned.fullmatch(os.path.basename(ref[0])) is not None)


def _with_image_refs(record: dict, refs: list[str]) -> dict:
    """`record` with its image field (official `image` list, LLaVA `image` string or list) replaced."""
    out = dict(record)
    out["image"] = refs[0] if isinstance(record.get("image"), str) and len(refs) == 1 else refs
    return out


def make_instruction_shards(data: str, fmt: str, out_dir: str, *, image_root: str = "",
                            images_per_shard: int = 1000, prefix: str = "images-", image_format: str = "keep",
                            workers: int = 1, max_skip_fraction: float | None = None,
                            max_pixels: int = image_ops.DEFAULT_MAX_PIXELS, name: str | None = None,
                            force: bool = False) -> Report:
    """Instruction json/jsonl + image root -> `out_dir/{name}.jsonl` (same format, image references
    rewritten to `{prefix}NNNNN.tar/KEY.ext`, relative to `out_dir`) and the image tar shards. An image
    used by several records is stored once; a record with any unusable image is skipped. `out_dir` is
    checked first; with `force`, the set's old files there are removed once the records have been read."""
    t0 = time.perf_counter()
    if fmt not in READERS:
        raise MakeShardsError(f"unknown instruction format {fmt!r}; known: {sorted(READERS)}")
    if image_format not in ("keep", "jpg", "png", "webp"):
        raise MakeShardsError(f"--image-format must be keep, jpg, png or webp, not {image_format!r}")
    check_output(out_dir, force)
    name = name or Path(data).stem
    out_path = os.path.join(out_dir, f"{name}.jsonl")
    if os.path.abspath(out_path) == os.path.abspath(data):
        raise MakeShardsError(f"the output {out_path} would overwrite the input; choose another --out or --name")
    source = InstructionSource(name, data, fmt, image_root=image_root)
    try:
        records, lines = load_records(source)
    except DataError as e:
        raise MakeShardsError(str(e)) from None
    report = Report("instructions")

    def where(i: int) -> str:
        return f"record {i}" + (f" (line {lines[i]})" if lines else "")

    # 1. read every record; collect the unique images in order of first use
    readable: list[tuple[int, dict, tuple[str, ...]]] = []
    unique: dict[str, int] = {}
    for i, rec in enumerate(records):
        try:
            if not isinstance(rec, dict) and hasattr(rec, "detail"):  # a jsonl line that is not json
                report.skip("malformed_json", where(i), rec.detail)
                continue
            conv = read_record(rec, fmt)
        except BadRecord as e:
            report.skip(reason_key(e.reason), where(i), e.reason)
            continue
        paths = tuple(source.resolve(p) for p in conv.images)
        for p in paths:
            unique.setdefault(p, len(unique))
        readable.append((i, rec, paths))

    owned = _owned_files(prefix, [f"{name}.jsonl", "instructions_stats.json"])
    if force:  # re-sharding a set in place would delete the image shards it reads
        inside = next((p for p in unique if _in_owned_shard(p, out_dir, owned)), None)
        if inside is not None:
            raise OutputError(f"--force would remove the image shards the input reads ({inside}); write to "
                              f"another --out")
    prepare_output(out_dir, owned)

    # 2. check and store every image once
    refs: dict[str, str] = {}
    bad: dict[str, tuple[str, str]] = {}
    order = list(unique)
    out_root = os.path.abspath(out_dir)
    writer = ShardWriter(os.path.join(out_dir, f"{prefix}%05d.tar"), images_per_shard)
    try:
        with image_loader(workers) as load:
            jobs = [ImageJob(k, p, image_format, max_pixels) for k, p in enumerate(order)]
            for loaded in load(jobs):
                path = order[loaded.index]
                if loaded.reason:
                    bad[path] = (loaded.reason, loaded.detail)
                    continue
                key = f"{loaded.index:09d}"
                writer.write(key, {loaded.ext: loaded.data,
                                   "json": json.dumps({"key": key, "image": path}).encode("utf-8")})
                tar = os.path.relpath(os.path.abspath(writer.paths[-1]), out_root)
                refs[path] = f"{tar}/{key}.{loaded.ext}"
                report.images += 1
    finally:
        writer.close()
        report.shards = list(writer.paths)

    # 3. write the records whose images are all usable
    with open(out_path, "w", encoding="utf-8") as out:
        for i, rec, paths in readable:
            broken = next((p for p in paths if p in bad), None)
            if broken is not None:
                reason, detail = bad[broken]
                report.skip(reason, where(i), detail)
                continue
            record = _with_image_refs(rec, [refs[p] for p in paths]) if paths else rec
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            report.samples += 1
    report.outputs = [out_path]
    report.considered = len(records)
    report.seconds = time.perf_counter() - t0
    report.check(max_skip_fraction, final=True)
    return report


# ----------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_pipelines.make_shards", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="kind", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--out", required=True, help="output folder")
        q.add_argument("--image-format", default="keep", choices=("keep", "jpg", "png", "webp"),
                       help="keep JPEG/PNG/WebP bytes as they are (default), or store every image in one format")
        q.add_argument("--workers", type=int, default=1, help="processes checking / encoding images")
        q.add_argument("--force", action="store_true",
                       help="write into a non-empty --out, first removing the old files of this set (its "
                            "numbered shards, records file and stats); other files are kept")
        q.add_argument("--max-skip-fraction", type=float, default=DEFAULT_MAX_SKIP_FRACTION,
                       help="fail (exit 1) when more than this fraction of rows is unusable "
                            f"(default {DEFAULT_MAX_SKIP_FRACTION}; 1 accepts any)")
        q.add_argument("--max-pixels", type=int, default=image_ops.DEFAULT_MAX_PIXELS,
                       help="skip larger images as decompression_bomb (default "
                            f"{image_ops.DEFAULT_MAX_PIXELS:,}, ~9459x9459; raise it for big photos)")
        q.add_argument("--quiet", action="store_true", help="no per-row warnings (the summary still counts them)")

    c = sub.add_parser("captions", help="image folder + captions table -> webdataset caption shards")
    c.add_argument("--images", required=True, help="folder the table's file names are relative to")
    c.add_argument("--captions", required=True, help="captions table: .csv, .tsv, .jsonl or .parquet")
    c.add_argument("--table-format", choices=("csv", "tsv", "jsonl", "parquet"), default=None,
                   help="table format (default: from the file name)")
    c.add_argument("--image-column", default=None, help=f"file-name column (default: first of {IMAGE_COLUMNS})")
    c.add_argument("--caption-column", default=None, help=f"caption column (default: first of {CAPTION_COLUMNS})")
    c.add_argument("--samples-per-shard", type=int, default=1000)
    c.add_argument("--prefix", default="", help="shard file prefix (shards are PREFIX00000.tar, ...)")
    common(c)

    i = sub.add_parser("instructions", help="instruction json/jsonl + image root -> jsonl + image tar shards")
    i.add_argument("--data", required=True, help="instruction .json (a list) or .jsonl file")
    i.add_argument("--format", required=True, choices=sorted(READERS), help="record format")
    i.add_argument("--image-root", default="", help="folder relative image paths are resolved against")
    i.add_argument("--images-per-shard", type=int, default=1000)
    i.add_argument("--prefix", default="images-", help="image shard prefix")
    i.add_argument("--name", default=None, help="output name (default: the input's stem)")
    common(i)
    return p


def _write_stats(out_dir: str, kind: str, report: Report) -> None:
    """`{kind}_stats.json`: the report (counts by reason, examples) as json, also after a failed check."""
    with contextlib.suppress(OSError), open(os.path.join(out_dir, f"{kind}_stats.json"), "w") as f:
        json.dump(report.to_json(), f, indent=1)


def main(argv: Sequence[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    if not 0 <= args.max_skip_fraction <= 1:
        p.error(f"--max-skip-fraction must be in [0, 1], not {args.max_skip_fraction}")
    if args.max_pixels < 1:
        p.error(f"--max-pixels must be positive, not {args.max_pixels}")
    logging.basicConfig(level=logging.ERROR if args.quiet else logging.WARNING, format="%(message)s")
    try:
        if args.kind == "captions":
            report = make_caption_shards(args.captions, args.images, args.out, image_column=args.image_column,
                                         caption_column=args.caption_column, table_format_=args.table_format,
                                         samples_per_shard=args.samples_per_shard, prefix=args.prefix,
                                         image_format=args.image_format, workers=args.workers,
                                         max_skip_fraction=args.max_skip_fraction, max_pixels=args.max_pixels,
                                         force=args.force)
        else:
            report = make_instruction_shards(args.data, args.format, args.out, image_root=args.image_root,
                                             images_per_shard=args.images_per_shard, prefix=args.prefix,
                                             image_format=args.image_format, workers=args.workers,
                                             max_skip_fraction=args.max_skip_fraction,
                                             max_pixels=args.max_pixels, name=args.name, force=args.force)
    except OutputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except MakeShardsError as e:
        if e.report is not None:
            print(e.report.summary())
            _write_stats(args.out, args.kind, e.report)
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # checked before the work: a disk that filled up, a folder removed meanwhile
        print(f"error: writing to {args.out} failed: {e}", file=sys.stderr)
        return 1
    print(report.summary())
    _write_stats(args.out, args.kind, report)
    if args.kind == "captions" and report.shards:
        print(f"  config: data.train_paths: [\"{shard_pattern(report.shards)}\"]")
    elif args.kind == "instructions":
        print(f"  config: data.sources: [{{name: {Path(report.outputs[0]).stem}, path: {report.outputs[0]}, "
              f"format: {args.format}, image_root: {args.out}}}]")
    if not report.samples:
        print("error: nothing usable was written", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
