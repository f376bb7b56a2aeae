"""Declarative tensor maps between PyTorch checkpoint keys and owl-jax canonical parameter paths.

A `TensorRule` pairs one checkpoint key with one canonical path (see `convert.state`) and the two
array transforms between them. A model family is a list of rules built from its config; import and
export are the same table read in opposite directions, which is what makes round trips exact.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Mapping

import numpy as np

Transform = Callable[[np.ndarray], np.ndarray]


def identity(x: np.ndarray) -> np.ndarray:
    return x


def transpose(x: np.ndarray) -> np.ndarray:
    """torch Linear (out, in) <-> Flax kernel (in, out). A view: no copy here (writers and placement make
    the one contiguous copy), which also lets `transformed_shape` run it on a zero-stride probe."""
    return np.swapaxes(x, -1, -2)


def reshape_to(shape: tuple[int, ...]) -> Transform:
    return lambda x: np.reshape(x, shape)


@dataclasses.dataclass(frozen=True)
class TensorRule:
    key: str  # checkpoint key
    path: str  # canonical owl-jax path
    to_jax: Transform = identity
    to_torch: Transform = identity


def linear(key: str, path: str, *, bias: bool) -> list[TensorRule]:
    """A torch `nn.Linear` (`key.weight`, `key.bias`) <-> a `Dense` (`path.kernel`, `path.bias`)."""
    rules = [TensorRule(f"{key}.weight", f"{path}.kernel", transpose, transpose)]
    if bias:
        rules.append(TensorRule(f"{key}.bias", f"{path}.bias"))
    return rules


def layer_norm(key: str, path: str, *, bias: bool = True) -> list[TensorRule]:
    rules = [TensorRule(f"{key}.weight", f"{path}.scale")]
    if bias:
        rules.append(TensorRule(f"{key}.bias", f"{path}.bias"))
    return rules


def prefixed(rules: Iterable[TensorRule], *, key_prefix: str = "", path_prefix: str = "") -> list[TensorRule]:
    return [dataclasses.replace(r, key=key_prefix + r.key, path=path_prefix + r.path) for r in rules]


class CheckpointMismatchError(ValueError):
    """A checkpoint's tensors do not match what the model expects."""


def _listing(title: str, items: list[str]) -> str:
    shown = ", ".join(items[:20]) + (f", ... ({len(items)} in all)" if len(items) > 20 else "")
    return f"{title} ({len(items)}): {shown}"


def check_keys(keys: Iterable[str], rules: list[TensorRule], *, ignore: Iterable[str] = (),
               source: str = "checkpoint") -> None:
    """Every rule's key present and no other key (besides `ignore`d substrings, e.g. rotary `inv_freq`
    buffers); otherwise a CheckpointMismatchError listing the missing and unexpected keys by name."""
    ignore = tuple(ignore)
    have = set(keys)
    wanted = {r.key for r in rules}
    missing = sorted(k for k in wanted if k not in have)
    unexpected = sorted(k for k in have if k not in wanted and not any(s in k for s in ignore))
    if missing or unexpected:
        parts = [_listing(t, i) for t, i in (("missing", missing), ("unexpected", unexpected)) if i]
        raise CheckpointMismatchError(f"{source} does not match the model: " + "; ".join(parts))


def transformed_shape(rule: TensorRule, shape: tuple[int, ...], dtype=np.float32) -> tuple[int, ...]:
    """The shape `rule.to_jax` gives a checkpoint tensor of `shape`, computed on a zero-stride probe (no
    memory touched), so a whole checkpoint can be checked against a model from its headers alone. Raises
    ValueError when the transform cannot take that shape (e.g. a reshape of the wrong size)."""
    probe = np.lib.stride_tricks.as_strided(np.zeros((), dtype), shape, (0,) * len(shape))
    return tuple(np.shape(rule.to_jax(probe)))


def tensors_to_params(tensors: Mapping[str, np.ndarray], rules: list[TensorRule], *,
                      ignore: Iterable[str] = (), source: str = "checkpoint") -> dict[str, np.ndarray]:
    """Checkpoint tensors -> canonical params. Keys not covered by a rule (other than `ignore`d
    substrings, e.g. rotary `inv_freq` buffers) and rules with no tensor are errors, listed by name."""
    check_keys(tensors, rules, ignore=ignore, source=source)
    out, misshaped = {}, []
    for r in rules:
        value = np.asarray(tensors[r.key])
        try:
            out[r.path] = r.to_jax(value)
        except ValueError as e:  # e.g. a reshape_to rule given a tensor of the wrong size
            misshaped.append(f"{r.key} {tuple(value.shape)} ({e})")
    if misshaped:
        raise CheckpointMismatchError(f"{source} does not match the model: " + _listing("mis-shaped", misshaped))
    return out


def params_to_tensors(params: Mapping[str, np.ndarray], rules: list[TensorRule]) -> dict[str, np.ndarray]:
    """Canonical params -> checkpoint tensors (torch layouts)."""
    missing = sorted(r.path for r in rules if r.path not in params)
    if missing:
        raise CheckpointMismatchError("model lacks parameters for export: " + _listing("missing", missing))
    return {r.key: np.ascontiguousarray(r.to_torch(np.asarray(params[r.path]))) for r in rules}
