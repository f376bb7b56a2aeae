"""Webdataset tar shards as random-access sample indexes.

A shard is indexed once (tar headers only: name, data offset, size), members are grouped into samples
by key the way webdataset does (`dir/key.jpg` + `dir/key.txt` + `dir/key.json` -> key `dir/key`), and
a sample is then read by seeking to its members. Random access is what makes the pipeline's order a
pure function of (seed, epoch, position): shuffling, exact resume and sharding across processes need no
streaming buffers.

Sources: local paths, brace patterns (`laion-{00000..09999}.tar`), fsspec URLs (`gs://`, `s3://`, ...:
fetched to a local cache file once), `pipe:` commands (their stdout is the tar) and prepared TFDS
datasets (`tfds:...`, virtual shards of records; see `tfds_source`).

Gzip-compressed shards (`.tgz`, `.tar.gz`; recognised by their magic bytes, whatever the name) are
decompressed once into the cache folder and indexed there. A gzip stream has no random access: reading
it sequentially would tie the order to the file layout (no shuffling inside a window, no exact resume
without re-reading from the start), and seeking into it means decompressing everything before the
target on every read. Decompressing to a cache file costs one pass and the uncompressed size on disk
(a tar of JPEGs barely compresses, so that is about the shard's own size), and then every sample is
one seek, exactly as for plain tars. The cache entry is keyed by the source and, for local files, its
size and mtime (a rewritten shard is decompressed again); a damaged gzip stream keeps what decompressed
before the damage and the shard is reported as truncated.

Damage. A truncated or damaged tar keeps every complete sample before the damage (and is reported as
truncated): a sample is dropped only when one of its own members is cut. When the cut falls between
members (inside a header, or where the end-of-archive blocks should be) the name of the lost member is
unknown, so the last sample is kept: if it really lost a member it needs, the pipeline counts it under
that member's reason (`missing_caption`, ...), which is visible, instead of silently dropping a sample
that may be whole.

Retries. Only what can be transient is retried (downloads and `pipe:` commands that fail, I/O errors
while reading): a missing file, a folder, a file that is not a tar (or not gzip) fail at once.
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
import zlib
from pathlib import Path
from typing import Iterable

import braceexpand

log = logging.getLogger(__name__)


class ShardError(Exception):
    """A shard that cannot be read at all. `transient`: the failure may go away on a retry (a network
    download, a `pipe:` command, an I/O error), unlike a missing file or bytes that are not a tar."""

    def __init__(self, message: str, *, transient: bool = False):
        super().__init__(message)
        self.transient = transient


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


def _cache_file(cache_dir: str) -> str:
    """A fresh temporary file in the cache folder (unique: several processes of a host may fill the same
    cache entry at once; each writes its own file and renames it into place)."""
    fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".part")
    os.close(fd)
    return tmp


def _fetch(source: str, cache_dir: str) -> str:
    """Local path of a shard, downloading remote or `pipe:` sources into the cache once."""
    if source.startswith("pipe:"):
        target = Path(cache_dir) / (hashlib.sha1(source.encode()).hexdigest() + ".tar")
        if not target.exists():
            tmp = _cache_file(cache_dir)
            with open(tmp, "wb") as out:
                proc = subprocess.run(source[len("pipe:"):], shell=True, stdout=out, stderr=subprocess.PIPE)
            if proc.returncode != 0:
                os.unlink(tmp)
                # 126/127: the command cannot run at all; anything else (curl, gsutil, ...) may be the network
                raise ShardError(f"{source}: command failed ({proc.returncode}): "
                                 f"{proc.stderr.decode(errors='replace')[-300:]}",
                                 transient=proc.returncode not in (126, 127))
            os.replace(tmp, target)
        return str(target)
    if "://" in source and not source.startswith("file://"):
        import fsspec
        target = Path(cache_dir) / (hashlib.sha1(source.encode()).hexdigest() + ".tar")
        if not target.exists():
            tmp = _cache_file(cache_dir)
            try:
                with fsspec.open(source, "rb") as src, open(tmp, "wb") as out:
                    while chunk := src.read(1 << 22):
                        out.write(chunk)
            except Exception as e:
                os.unlink(tmp)
                missing = isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError))
                raise ShardError(f"{source}: download failed: {e}", transient=not missing) from e
            os.replace(tmp, target)
        return str(target)
    path = source[len("file://"):] if source.startswith("file://") else source
    if os.path.isdir(path):
        raise ShardError(f"{path}: a folder, not a shard")
    if not os.path.isfile(path):
        raise ShardError(f"{path}: no such shard")
    return path


GZIP_MAGIC = b"\x1f\x8b"


def _is_gzip(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(2) == GZIP_MAGIC
    except OSError as e:
        raise ShardError(f"{path}: cannot read: {e}", transient=not isinstance(e, PermissionError)) from e


def _gunzip(source: str, path: str, cache_dir: str) -> tuple[str, str]:
    """(decompressed tar in the cache, "" or what was wrong with the gzip stream). See the module
    docstring for why gzip shards are decompressed to a file rather than streamed."""
    st = os.stat(path)
    stem = hashlib.sha1(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    whole, damaged = Path(cache_dir) / f"{stem}.tar", Path(cache_dir) / f"{stem}.damaged.tar"
    if whole.exists():
        return str(whole), ""
    if damaged.exists():
        return str(damaged), "damaged gzip stream"
    tmp = _cache_file(cache_dir)
    problem, written, decomp = "", 0, None
    try:
        with open(path, "rb") as src, open(tmp, "wb") as out:
            while chunk := src.read(1 << 22):
                while chunk:
                    if decomp is None or decomp.eof:  # the first, or a concatenated gzip member
                        decomp = zlib.decompressobj(16 + zlib.MAX_WBITS)
                    data = decomp.decompress(chunk)
                    out.write(data)
                    written += len(data)
                    chunk = decomp.unused_data if decomp.eof else b""
        if decomp is None or not decomp.eof:
            problem = "gzip stream ends early"
    except zlib.error as e:
        problem = f"gzip data error ({e})"
    except OSError as e:
        os.unlink(tmp)
        raise ShardError(f"{source}: cannot decompress: {e}", transient=True) from e
    if problem and not written:
        os.unlink(tmp)
        raise ShardError(f"{source}: not a readable gzip file ({problem})")
    os.replace(tmp, damaged if problem else whole)
    return str(damaged if problem else whole), problem


def index_tar(source: str, local_path: str, damaged: str = "") -> ShardIndex:
    """Scan tar headers; damage keeps every complete sample before it (`truncated=True`, see the module
    docstring). `damaged`: a problem already found upstream (a cut gzip stream)."""
    groups: dict[str, dict[str, tuple[int, int]]] = {}
    order: list[str] = []
    truncated, cut_key = bool(damaged), None  # cut_key: the sample whose member runs past the end
    try:
        size = os.path.getsize(local_path)
        with open(local_path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for member in tar:
                split = _split_key(member.name) if member.isfile() else None
                if member.isfile() and member.offset_data + member.size > size:
                    truncated, cut_key = True, split[0] if split else None
                    break
                if split is None:
                    continue
                key, ext = split
                if key not in groups:
                    groups[key] = {}
                    order.append(key)
                groups[key][ext] = (member.offset_data, member.size)
            else:
                # tarfile also ends quietly on a cut or garbled header: a whole archive ends in zero blocks
                f.seek(tar.offset)
                if f.read(tarfile.BLOCKSIZE) != bytes(tarfile.BLOCKSIZE):
                    truncated = True
    except (tarfile.TarError, EOFError) as e:
        if not order:
            raise ShardError(f"{source}: not a readable tar ({e})") from e
        truncated = True  # e.g. cut in the padding after a complete member
    except OSError as e:
        raise ShardError(f"{source}: cannot read: {e}", transient=True) from e
    if cut_key in groups:
        order.remove(cut_key)  # it lost (part of) a member
    samples = [SampleRef(local_path, key, tuple(sorted((ext, *where) for ext, where in groups[key].items())))
               for key in order]
    return ShardIndex(source=source, local_path=local_path, samples=samples, truncated=truncated)


def local_tar(source: str, cache_dir: str) -> tuple[str, str]:
    """(local plain tar of a source, "" or a problem of its gzip stream): fetched, and decompressed
    when it is gzip."""
    path = _fetch(source, cache_dir)
    if _is_gzip(path):
        return _gunzip(source, path, cache_dir)
    return path, ""


def open_shard(source: str, *, cache_dir: str | None = None, retries: int = 3,
               retry_delay: float = 0.5) -> ShardIndex:
    """Fetch (if remote), decompress (if gzip) and index a shard, retrying transient failures only;
    ShardError when it stays bad."""
    if source.startswith("tfds:"):
        from data_pipelines import tfds_source
        try:
            base, name, records = tfds_source.shard_records(source)
        except tfds_source.TfdsSourceError as e:
            raise ShardError(str(e)) from None
        return ShardIndex(source, base, [SampleRef(base, f"{name}/{i}", (("tfds", i, 0),)) for i in records])
    cache_dir = cache_dir or os.path.join(tempfile.gettempdir(), "owl_jax_shards")
    os.makedirs(cache_dir, exist_ok=True)
    last: ShardError | None = None
    for attempt in range(retries):
        try:
            path, damaged = local_tar(source, cache_dir)
            return index_tar(source, path, damaged)
        except ShardError as e:
            if not e.transient:
                raise
            last = e
            if attempt + 1 < retries:
                time.sleep(retry_delay * (2 ** attempt))
    raise ShardError(f"{last} (after {retries} attempts)", transient=True)


def read_member(local_path: str, offset: int, size: int) -> bytes:
    with open(local_path, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise ShardError(f"{local_path}: short read at {offset}")
    return data
