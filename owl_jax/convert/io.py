"""Reading and writing PyTorch-side weight files without pickle.

Safetensors are parsed directly (8-byte header length, JSON header, raw little-endian data) and read
one tensor at a time straight into its array (no intermediate buffer) — the basis of streaming import
of 7B-scale checkpoints (`convert.sources`, `convert.stream`) — and bfloat16 works without torch. Legacy
`.bin` files go through `torch.load(weights_only=True)`, which refuses arbitrary pickled code. Exports
are written as one file or as HF-style shards with a `*.safetensors.index.json` (`save_safetensors_checkpoint`).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Iterator, Mapping

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


class WeightFileError(ValueError):
    """A weight file or directory is missing, unreadable or not what it claims to be."""


class SafetensorsFile:
    """Lazy view of one `.safetensors` file: `keys()`, `shape(k)`, `dtype(k)` from the header; `read(k)`
    reads one tensor by its offset."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                if header_len > 100 * 2**20:
                    raise WeightFileError(f"{self.path}: implausible safetensors header ({header_len} bytes)")
                header = json.loads(f.read(header_len))
        except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise WeightFileError(f"{self.path}: not a readable safetensors file ({e})") from e
        self.metadata = header.pop("__metadata__", {}) or {}
        self._entries = header
        self._data_start = 8 + header_len
        self._size = self.path.stat().st_size

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._entries[key]["shape"])

    def dtype(self, key: str) -> np.dtype:
        name = self._entries[key]["dtype"]
        if name not in _DTYPES:
            raise WeightFileError(f"{self.path}: tensor {key!r} has unsupported dtype {name}")
        return np.dtype(_DTYPES[name])

    def read(self, key: str) -> np.ndarray:
        """One tensor, read from disk into a fresh array (the only host copy: no bytes buffer in between)."""
        entry = self._entries[key]
        dtype = self.dtype(key)
        begin, end = entry["data_offsets"]
        if self._data_start + end > self._size:
            raise WeightFileError(f"{self.path}: tensor {key!r} extends past the end of the file (truncated?)")
        out = np.empty(entry["shape"], dtype=dtype)
        if out.nbytes != end - begin:
            raise WeightFileError(f"{self.path}: tensor {key!r} has {end - begin} bytes for shape "
                                  f"{tuple(entry['shape'])} {dtype} ({out.nbytes} expected)")
        with open(self.path, "rb") as f:
            f.seek(self._data_start + begin)
            got = f.readinto(memoryview(out.reshape(-1).view(np.uint8)))
        if got != out.nbytes:
            raise WeightFileError(f"{self.path}: tensor {key!r} is truncated")
        return out


def save_safetensors(tensors: Mapping[str, np.ndarray], path: str | os.PathLike,
                     metadata: Mapping[str, str] | None = None) -> None:
    """Write a safetensors file (keys sorted, 8-byte aligned header, like the reference writer)."""
    header, offset, arrays = {}, 0, []
    for key in sorted(tensors):
        arr = np.asarray(tensors[key], order="C")  # (np.ascontiguousarray turns 0-d into 1-d)
        if arr.dtype not in _NAMES:
            raise WeightFileError(f"cannot store dtype {arr.dtype} of {key!r} in safetensors")
        header[key] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape),
                       "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    if metadata:
        header["__metadata__"] = dict(metadata)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in arrays:
            f.write(arr.tobytes())


def torch_state(path: Path, *, mmap: bool = False) -> dict:
    """The tensors of a `.bin` file as torch tensors, via `torch.load(weights_only=True)`. With `mmap`
    (zip-format files, the default since torch 1.6) the data stays on disk until a tensor is used."""
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise WeightFileError(f"{path}: reading legacy .bin weights needs torch (pip install torch)") from e
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as e:
            if not mmap or "mmap" not in str(e):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as e:  # torch raises many types for bad or unsafe pickles
        raise WeightFileError(f"{path}: cannot load with torch.load(weights_only=True): {e}") from e
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return {k: t for k, t in state.items() if hasattr(t, "detach")}


def torch_to_numpy(t) -> np.ndarray:
    """A CPU torch tensor as a numpy array (bfloat16 through ml_dtypes)."""
    import torch

    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _torch_load(path: Path) -> dict[str, np.ndarray]:
    return {key: torch_to_numpy(t) for key, t in torch_state(path).items()}


def _index_files(directory: Path, index_name: str) -> list[Path]:
    try:
        names = sorted(set(json.loads((directory / index_name).read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise WeightFileError(f"{directory / index_name}: not a readable checkpoint index ({e!r})") from e
    return [directory / f for f in names]


def weight_files(path: str | os.PathLike) -> list[Path]:
    """The weight files of a checkpoint file or directory (safetensors preferred over .bin)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise WeightFileError(f"{path}: no such file or directory")
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json"),
                          ("adapter_model.safetensors", None), ("adapter_model.bin", None)):
        if (path / single).is_file():
            return [path / single]
        if index and (path / index).is_file():
            files = _index_files(path, index)
            absent = [str(f) for f in files if not f.is_file()]
            if absent:
                raise WeightFileError(f"{path / index} names missing shard files: {', '.join(absent)}")
            return files
    raise WeightFileError(f"{path}: no model.safetensors, model.safetensors.index.json, pytorch_model.bin or "
                          f"pytorch_model.bin.index.json (is this a Hugging Face checkpoint directory?)")


def iter_tensors(path: str | os.PathLike) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (key, array) one tensor at a time; host memory holds one tensor for safetensors inputs."""
    for f in weight_files(path):
        if f.suffix == ".safetensors":
            st = SafetensorsFile(f)
            for key in st.keys():
                yield key, st.read(key)
        elif f.suffix in (".bin", ".pt", ".pth"):
            yield from _torch_load(f).items()
        else:
            raise WeightFileError(f"{f}: unknown weight file type (expected .safetensors or .bin)")


def load_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    return dict(iter_tensors(path))


def save_safetensors_checkpoint(tensors: Mapping[str, np.ndarray], directory: str | os.PathLike, *,
                                max_shard_bytes: int, basename: str = "model",
                                metadata: Mapping[str, str] | None = None) -> list[Path]:
    """Write `tensors` as Hugging Face writes a checkpoint: one `{basename}.safetensors`, or, when the total
    exceeds `max_shard_bytes`, shards `{basename}-00001-of-0000N.safetensors` (keys in sorted order, each
    shard at most `max_shard_bytes` unless one tensor alone is larger) plus `{basename}.safetensors.index.json`
    mapping every key to its shard. Returns the files written. `metadata` defaults to `{"format": "pt"}`,
    which transformers checks."""
    directory = Path(directory)
    metadata = dict(metadata or {"format": "pt"})
    sizes = {k: np.asarray(v).nbytes for k, v in tensors.items()}
    total = sum(sizes.values())
    if total <= max_shard_bytes:
        path = directory / f"{basename}.safetensors"
        save_safetensors(tensors, path, metadata)
        return [path]
    groups: list[list[str]] = [[]]
    used = 0
    for key in sorted(tensors):
        if groups[-1] and used + sizes[key] > max_shard_bytes:
            groups.append([])
            used = 0
        groups[-1].append(key)
        used += sizes[key]
    paths, weight_map = [], {}
    for i, keys in enumerate(groups):
        name = f"{basename}-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_safetensors({k: tensors[k] for k in keys}, directory / name, metadata)
        weight_map.update((k, name) for k in keys)
        paths.append(directory / name)
    index = directory / f"{basename}.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    return paths + [index]
