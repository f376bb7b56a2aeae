"""Lazy, key-addressed views of checkpoint tensors: the input side of streaming import.

A `TensorSource` lists its keys and their shapes from file headers alone and reads one tensor when asked,
so an importer can check a whole checkpoint against the model before reading any data and then hold one
tensor at a time. Sources over (sharded) safetensors read by offset; legacy `.bin` files are opened with
`torch.load(weights_only=True, mmap=True)`, which leaves the data on disk until a tensor is used. Views
(`FilteredSource`, `clip.HFClipAsOfficial`) rename, hide or combine tensors without reading them early.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from owl_jax.convert import io


class TensorSource:
    """Checkpoint tensors by key. Subclasses implement `keys`, `shape` and `read`; `name` (a path, usually)
    is what error messages call the checkpoint."""

    name: str = "checkpoint"

    def keys(self) -> list[str]:
        raise NotImplementedError

    def shape(self, key: str) -> tuple[int, ...]:
        raise NotImplementedError

    def dtype(self, key: str) -> np.dtype:
        raise NotImplementedError

    def read(self, key: str) -> np.ndarray:
        raise NotImplementedError

    def __contains__(self, key: str) -> bool:
        return key in set(self.keys())


class DictSource(TensorSource):
    """In-memory tensors (tests, and the dict-based conversion helpers)."""

    def __init__(self, tensors: Mapping[str, np.ndarray], name: str = "checkpoint"):
        self._tensors = tensors
        self.name = name

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(np.shape(self._tensors[key]))

    def dtype(self, key: str) -> np.dtype:
        return np.asarray(self._tensors[key]).dtype

    def read(self, key: str) -> np.ndarray:
        return np.asarray(self._tensors[key])

    def __contains__(self, key: str) -> bool:
        return key in self._tensors


class SafetensorsSource(TensorSource):
    """One or more safetensors files (the shards of an index) seen as one key space; a key present in two
    files is an error, since which one wins would be arbitrary."""

    def __init__(self, files: list[Path], name: str):
        self.name = name
        self._files = [io.SafetensorsFile(f) for f in files]
        self._where: dict[str, io.SafetensorsFile] = {}
        for f in self._files:
            for key in f.keys():
                if key in self._where:
                    raise io.WeightFileError(f"{name}: tensor {key!r} is stored twice ({self._where[key].path.name} "
                                             f"and {f.path.name})")
                self._where[key] = f

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._where[key].shape(key)

    def dtype(self, key: str) -> np.dtype:
        return self._where[key].dtype(key)

    def read(self, key: str) -> np.ndarray:
        return self._where[key].read(key)

    def __contains__(self, key: str) -> bool:
        return key in self._where


class TorchBinSource(TensorSource):
    """Legacy `pytorch_model*.bin` files. Each file is opened memory-mapped once and kept open (its tensors
    stay on disk until read); `read` returns a numpy copy of one tensor."""

    def __init__(self, files: list[Path], name: str):
        self.name = name
        self._states = [io.torch_state(f, mmap=True) for f in files]
        self._where = {k: state for state in self._states for k in state}

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._where[key][key].shape)

    def dtype(self, key: str) -> np.dtype:
        return io.torch_to_numpy(self._where[key][key].reshape(-1)[:0]).dtype

    def read(self, key: str) -> np.ndarray:
        return np.array(io.torch_to_numpy(self._where[key][key]), copy=True)

    def __contains__(self, key: str) -> bool:
        return key in self._where


class FilteredSource(TensorSource):
    """The keys of `source` for which `keep(key)` holds (e.g. the vision tower of a full CLIPModel)."""

    def __init__(self, source: TensorSource, keep: Callable[[str], bool]):
        self._source = source
        self.name = source.name
        self._keys = [k for k in source.keys() if keep(k)]
        self._set = set(self._keys)

    def keys(self) -> list[str]:
        return list(self._keys)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._source.shape(self._check(key))

    def dtype(self, key: str) -> np.dtype:
        return self._source.dtype(self._check(key))

    def read(self, key: str) -> np.ndarray:
        return self._source.read(self._check(key))

    def __contains__(self, key: str) -> bool:
        return key in self._set

    def _check(self, key: str) -> str:
        if key not in self._set:
            raise KeyError(key)
        return key


def open_source(path: str | os.PathLike) -> TensorSource:
    """A checkpoint file or HF directory (single file, sharded index, or legacy `.bin`) as a lazy source.
    Only headers are read here."""
    files = io.weight_files(path)
    suffixes = {f.suffix for f in files}
    if suffixes == {".safetensors"}:
        return SafetensorsSource(files, str(path))
    if suffixes <= {".bin", ".pt", ".pth"}:
        return TorchBinSource(files, str(path))
    raise io.WeightFileError(f"{path}: unknown weight file type(s) {sorted(suffixes)} "
                             "(expected .safetensors or .bin)")


def read_all(source: TensorSource) -> dict[str, np.ndarray]:
    """Every tensor of `source` in memory (the eager path; fine for small checkpoints and tests)."""
    return {k: source.read(k) for k in source.keys()}
