"""Image references of instruction records: a plain file, or a member of a tar shard.

Millions of small image files are slow to copy, list and open on network filesystems, so
`make_shards` can store an instruction set's images in tar shards and write references of the form

    images-00003.tar/000000123.jpg          (a tar file treated as a directory)

which read like paths: they are joined to a source's `image_root` like any relative path, and a real
file of that name always wins. The tar is indexed once per process (member headers only) and each image
is then one seek and one read, as `shards.read_member` does for caption shards.

The index cache is keyed by (path, size, mtime) so a rewritten shard is indexed again, and bounded;
it is per process by design: `instructions.decode_images` must stay a pure function of picklable
arguments so that worker processes can run it.
"""

from __future__ import annotations

import functools
import os
import tarfile

from data_pipelines.shards import ShardError, read_member

TAR_SUFFIX = ".tar"


def split_tar_ref(path: str) -> tuple[str, str] | None:
    """(tar file, member name) when `path` points inside an existing tar file, else None. The first
    `*.tar` component that is a regular file decides (`a.tar/b.jpg` -> (`a.tar`, `b.jpg`))."""
    start = 0
    while True:
        i = path.find(TAR_SUFFIX + "/", start)
        if i < 0:
            return None
        tar_path, member = path[:i + len(TAR_SUFFIX)], path[i + len(TAR_SUFFIX) + 1:]
        if member and os.path.isfile(tar_path):
            return tar_path, member
        start = i + 1


@functools.lru_cache(maxsize=64)
def _members(tar_path: str, size: int, mtime_ns: int) -> dict[str, tuple[int, int]]:
    """{member name: (data offset, size)} of the regular files of a tar (headers only)."""
    del size, mtime_ns  # cache key only: a changed file is indexed again
    out: dict[str, tuple[int, int]] = {}
    try:
        with tarfile.open(tar_path, "r:") as tar:
            for m in tar:
                if m.isfile():
                    out[m.name.removeprefix("./")] = (m.offset_data, m.size)
    except (tarfile.TarError, EOFError) as e:
        if not out:
            raise OSError(f"{tar_path}: not a readable tar ({e})") from e
        # a damaged tail: the members before it stay readable
    return out


def tar_members(tar_path: str) -> dict[str, tuple[int, int]]:
    st = os.stat(tar_path)
    return _members(os.path.abspath(tar_path), st.st_size, st.st_mtime_ns)


def image_exists(path: str) -> bool:
    """Whether `path` is a file, or a member of a tar file (see the module docstring)."""
    if os.path.isfile(path):
        return True
    ref = split_tar_ref(path)
    if ref is None:
        return False
    try:
        return ref[1] in tar_members(ref[0])
    except OSError:
        return False


def read_image_bytes(path: str) -> bytes:
    """The bytes of a file or of a tar member. FileNotFoundError when neither exists (a tar without that
    member included); other OSErrors for unreadable files and tars."""
    ref = None if os.path.isfile(path) else split_tar_ref(path)
    if ref is None:
        with open(path, "rb") as f:
            return f.read()
    tar_path, member = ref
    where = tar_members(tar_path).get(member)
    if where is None:
        raise FileNotFoundError(f"{tar_path} has no member {member!r}")
    try:
        return read_member(tar_path, *where)
    except ShardError as e:  # callers count OSErrors as unreadable images
        raise OSError(f"{e}: member {member!r} (truncated tar?)") from None
