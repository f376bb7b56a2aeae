"""Writing webdataset caption shards (`{key}.jpg` + `{key}.txt` + `{key}.json`), as img2dataset lays
them out. Used by `make_shards`, the synthetic demo world and tests."""

from __future__ import annotations

import io
import json
import tarfile
import time
from typing import Iterable, Optional

from PIL import Image


def encode_image(image: Image.Image, fmt: str = "jpg", quality: int = 92) -> bytes:
    buf = io.BytesIO()
    if fmt in ("jpg", "jpeg"):
        image.convert("RGB").save(buf, "JPEG", quality=quality)
    elif fmt == "png":
        image.save(buf, "PNG")
    elif fmt == "webp":
        image.save(buf, "WEBP", quality=quality)
    else:
        raise ValueError(f"unsupported image format {fmt!r}")
    return buf.getvalue()


class ShardWriter:
    """Append samples to numbered tar shards (`pattern % shard_number`), `samples_per_shard` each."""

    def __init__(self, pattern: str, samples_per_shard: int = 1000):
        if "%" not in pattern:
            raise ValueError(f"shard pattern {pattern!r} needs a %d-style placeholder, e.g. out/shard-%05d.tar")
        self.pattern, self.samples_per_shard = pattern, samples_per_shard
        self.shard, self.count, self._tar = 0, 0, None
        self.paths: list[str] = []

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
        self._tar.addfile(info, io.BytesIO(data))

    def write(self, key: str, files: dict[str, bytes]) -> None:
        """One sample: {extension: bytes}, e.g. {"jpg": ..., "txt": b"a cat", "json": b"{}"}."""
        if self._tar is None or self.count == self.samples_per_shard:
            self.close()
            path = self.pattern % self.shard
            self._tar = tarfile.open(path, "w")
            self.paths.append(path)
            self.shard, self.count = self.shard + 1, 0
        for ext, data in files.items():
            self._add(f"{key}.{ext}", data)
        self.count += 1

    def write_caption(self, key: str, image: Image.Image | bytes, caption: str, meta: Optional[dict] = None,
                      image_format: str = "jpg") -> None:
        data = image if isinstance(image, bytes) else encode_image(image, image_format)
        files = {image_format: data, "txt": caption.encode("utf-8")}
        files["json"] = json.dumps({"key": key, "caption": caption, **(meta or {})}).encode()
        self.write(key, files)

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_caption_shards(samples: Iterable[tuple[str, Image.Image, str]], pattern: str,
                         samples_per_shard: int = 1000) -> list[str]:
    with ShardWriter(pattern, samples_per_shard) as writer:
        for key, image, caption in samples:
            writer.write_caption(key, image, caption)
    return writer.paths
