"""Webdataset tar shards as random-access sample indexes.

A shard is indexed once (tar headers only: name, data offset, size), members are grouped into samples
by key the way webdataset does (`dir/key.jpg` + `dir/key.txt` + `dir/key.json` -> key `dir/key`), and
a sample is then read by seeking to its members. Random access is what makes the pipeline's order a
pure function of (seed, epoch, position): shuffling, exact resume and sharding across processes need no
streaming buffers.

Sources: local paths, brace patterns (`laion-{00000..09999}.tar`), fsspec URLs (`gs://`, `s3://`, ...:
fetched to a local cache file once), `pipe:` commands (their stdout is the tar) and prepared TFDS
datasets (`tfds:...`, virtual shards of records; see `tfds_source`). A truncated tar keeps
the samples before the damage (and reports it); an unreadable shard is retried, then skipped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Iterable

import braceexpand

log = logging.getLogger(__name__)


class ShardError(Exception):
    """A shard that cannot be read at all."""


@dataclasses.dataclass(frozen=True)
class SampleRef:
    """Where a sample's files are inside its (local) tar: {extension: (offset, size)}."""

    path: str  # local file holding the bytes
    key: str
    files: tuple[tuple[str, int, int], ...]

    def members(self) -> dict[str, tuple[int, int]]:
        return {ext: (offset, size) for ext, offset, size in self.files}


@dataclasses.dataclass
class ShardIndex:
    source: str  # as given (URL or path)
    local_path: str  # where the bytes are
    samples: list[SampleRef]
    truncated: bool = False


def expand_sources(patterns: Iterable[str] | str) -> list[str]:
    """Brace-expand every pattern; order is kept (pipelines shuffle it per epoch themselves)."""
    if isinstance(patterns, str):
        patterns = [patterns]
    out = []
    for pattern in patterns:
        if pattern.startswith("tfds:"):  # a prepared TFDS dataset: virtual shards of its records
            from data_pipelines import tfds_source
            out.extend(tfds_source.expand(pattern))
            continue
        out.extend(braceexpand.braceexpand(pattern))
    return out


def _split_key(name: str) -> tuple[str, str] | None:
    """`dir/abc.def.jpg` -> (`dir/abc`, `def.jpg`) like webdataset (extension = after the first dot of
    the basename)."""
    directory, _, base = name.rpartition("/")
    if base.startswith(".") or "." not in base:
        return None
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def _fetch(source: str, cache_dir: str) -> str:
    """Local path of a shard, downloading remote or `pipe:` sources into the cache once."""
    if source.startswith("pipe:"):
        target = Path(cache_dir) / (hashlib.sha1(source.encode()).hexdigest() + ".tar")
        if not target.exists():
            tmp = target.with_suffix(".part")
            with open(tmp, "wb") as out:
                proc = subprocess.run(source[len("pipe:"):], shell=True, stdout=out, stderr=subprocess.PIPE)
            if proc.returncode != 0:
                tmp.unlink(missing_ok=True)
                raise ShardError(f"{source}: command failed ({proc.returncode}): "
                                 f"{proc.stderr.decode(errors='replace')[-300:]}")
            tmp.rename(target)
        return str(target)
    if "://" in source and not source.startswith("file://"):
        import fsspec
        target = Path(cache_dir) / (hashlib.sha1(source.encode()).hexdigest() + ".tar")
        if not target.exists():
            tmp = target.with_suffix(".part")
            try:
                with fsspec.open(source, "rb") as src, open(tmp, "wb") as out:
                    while chunk := src.read(1 << 22):
                        out.write(chunk)
            except Exception as e:
                tmp.unlink(missing_ok=True)
                raise ShardError(f"{source}: download failed: {e}") from e
            tmp.rename(target)
        return str(target)
    path = source[len("file://"):] if source.startswith("file://") else source
    if not os.path.isfile(path):
        raise ShardError(f"{path}: no such shard")
    return path


def index_tar(source: str, local_path: str) -> ShardIndex:
    """Scan tar headers; a damaged tail keeps the complete samples before it (`truncated=True`)."""
    groups: dict[str, dict[str, tuple[int, int]]] = {}
    order: list[str] = []
    truncated = False
    size = os.path.getsize(local_path)
    try:
        with tarfile.open(local_path, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                if member.offset_data + member.size > size:
                    truncated = True
                    break
                split = _split_key(member.name)
                if split is None:
                    continue
                key, ext = split
                if key not in groups:
                    groups[key] = {}
                    order.append(key)
                groups[key][ext] = (member.offset_data, member.size)
    except (tarfile.TarError, OSError, EOFError) as e:
        if not order:
            raise ShardError(f"{source}: not a readable tar ({e})") from e
        truncated = True
    if truncated and order:
        # The last sample may be missing members that lay past the damage.
        order.pop()
    samples = [SampleRef(local_path, key, tuple(sorted((ext, *where) for ext, where in groups[key].items())))
               for key in order]
    return ShardIndex(source=source, local_path=local_path, samples=samples, truncated=truncated)


def open_shard(source: str, *, cache_dir: str | None = None, retries: int = 3,
               retry_delay: float = 0.5) -> ShardIndex:
    """Fetch (if remote) and index a shard, retrying transient failures; ShardError when it stays bad."""
    if source.startswith("tfds:"):
        from data_pipelines import tfds_source
        try:
            base, name, records = tfds_source.shard_records(source)
        except tfds_source.TfdsSourceError as e:
            raise ShardError(str(e)) from None
        return ShardIndex(source, base, [SampleRef(base, f"{name}/{i}", (("tfds", i, 0),)) for i in records])
    cache_dir = cache_dir or os.path.join(tempfile.gettempdir(), "owl_jax_shards")
    os.makedirs(cache_dir, exist_ok=True)
    last: Exception | None = None
    for attempt in range(retries):
        try:
            return index_tar(source, _fetch(source, cache_dir))
        except ShardError as e:
            last = e
            if attempt + 1 < retries:
                time.sleep(retry_delay * (2 ** attempt))
    raise ShardError(f"{last} (after {retries} attempts)")


def read_member(local_path: str, offset: int, size: int) -> bytes:
    with open(local_path, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise ShardError(f"{local_path}: short read at {offset}")
    return data
