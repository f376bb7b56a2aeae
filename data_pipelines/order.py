"""Deterministic sample order, split across processes, with exactly resumable state.

The order of an epoch is a pure function of the seed: the shard list is permuted, cut into windows of
`window_shards` shards, and the samples of each window are permuted. A sample's place is its
*position* `(epoch, window, index)`. Process p of P takes the indices ≡ p (mod P) of every window, so
all processes advance through the same windows in lockstep and each sees different samples.

A process's iterator state is just its next position (plus positions already consumed ahead of it after
a re-split, see `remap_states`): JSON-serialisable, and restoring it replays exactly the batches the
uninterrupted run would have produced. It also carries the skip counters: bad samples are counted during
the first pass over the data only (epoch 0, where every sample has exactly one position, taken by exactly
one process), so each is counted once over the run however many epochs it is met in, and `considered`
(first-pass samples taken, usable or not) is the matching denominator of the skip fraction; shards that
failed are remembered by number (`bad_shards`) so that reopening them after a resume counts nothing.

When the number of processes changes between save and restore, `remap_states` merges the old states:
everything before the earliest saved position (over all old processes) was consumed; positions after it
that some old process had already consumed are carried as exclusions. The new processes continue from
that point with the new split, so no sample is seen twice or skipped.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Iterator

import numpy as np

Position = tuple[int, int, int]  # (epoch, window, index within window)


def epoch_shard_order(num_shards: int, epoch: int, seed: int, shuffle: bool) -> list[int]:
    if not shuffle:
        return list(range(num_shards))
    return [int(i) for i in np.random.default_rng([seed, epoch, 0x5EED]).permutation(num_shards)]


def window_sample_order(num_samples: int, epoch: int, window: int, seed: int, shuffle: bool) -> np.ndarray:
    if not shuffle:
        return np.arange(num_samples)
    return np.random.default_rng([seed, epoch, window, 0xC0FFEE]).permutation(num_samples)


@dataclasses.dataclass
class StreamState:
    """Where one process is: next position to consider and positions to skip (consumed elsewhere)."""

    process_index: int
    num_processes: int
    epoch: int = 0
    window: int = 0
    index: int = -1  # -1: first index of this process in the window (its residue)
    exclude: list[Position] = dataclasses.field(default_factory=list)
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)  # distinct bad samples / shards
    seen: int = 0  # usable samples taken (every epoch)
    considered: int = 0  # first-pass (epoch 0) samples taken, usable or not
    bad_shards: list[int] = dataclasses.field(default_factory=list)  # shard numbers counted in `skipped`

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["exclude"] = [list(p) for p in self.exclude]
        return d

    @classmethod
    def from_json(cls, d: dict) -> "StreamState":
        d = dict(d)
        d["exclude"] = [tuple(p) for p in d.get("exclude", [])]
        if "considered" not in d:  # saved before first-pass counting: the old denominator (usable + bad)
            d["considered"] = d.get("seen", 0) + sum(v for k, v in d.get("skipped", {}).items()
                                                     if not k.endswith("_shard"))
        return cls(**d)

    def position(self) -> Position:
        index = self.process_index if self.index < 0 else self.index
        return (self.epoch, self.window, index)


def positions(state: StreamState, window_sizes: Iterable[int]) -> Iterator[Position]:
    """This process's positions in the current epoch from `state` onward, given the sizes of the
    epoch's windows (in window order), skipping excluded ones."""
    excluded = set(map(tuple, state.exclude))
    p, n = state.process_index, state.num_processes
    for w, size in enumerate(window_sizes):
        if w < state.window:
            continue
        start = state.position()[2] if w == state.window else p
        start += (p - start) % n  # the first index of this process's residue at or after `start`
        for i in range(start, size, n):
            if (state.epoch, w, i) not in excluded:
                yield state.epoch, w, i


def remap_states(states: list[dict], num_processes: int, window_size) -> list[dict]:
    """Old per-process states (any count) -> states for `num_processes` new processes (see module doc).

    `window_size(epoch, window)` gives a window's sample count (the pipeline knows it from its shard
    indexes); it is needed when old processes stopped in different windows.
    """
    old = [StreamState.from_json(s) for s in states]
    if not old:
        raise ValueError("no saved iterator states to remap")
    old_n = old[0].num_processes
    if len(old) != old_n or sorted(s.process_index for s in old) != list(range(old_n)):
        raise ValueError(f"expected one state per old process (0..{old_n - 1}), got "
                         f"{sorted(s.process_index for s in old)}")
    cutoff = min(s.position() for s in old)
    consumed_ahead: set[Position] = set()
    for s in old:
        end = s.position()
        epoch, window, index = cutoff
        while (epoch, window) <= end[:2]:
            stop = end[2] if (epoch, window) == end[:2] else window_size(epoch, window)
            consumed_ahead.update((epoch, window, i) for i in range(index, stop) if i % old_n == s.process_index)
            if (epoch, window) == end[:2]:
                break
            window, index = window + 1, 0
            if window_size(epoch, window) is None:  # past the last window: next epoch
                epoch, window = epoch + 1, 0
        consumed_ahead.update(p for p in s.exclude if p >= cutoff)
    skipped: dict[str, int] = {}
    for s in old:
        for k, v in s.skipped.items():
            skipped[k] = skipped.get(k, 0) + v
    seen = sum(s.seen for s in old)
    considered = sum(s.considered for s in old)
    bad_shards = sorted({i for s in old for i in s.bad_shards})  # every new process knows them: none recounts
    new = []
    for q in range(num_processes):
        epoch, window, index = cutoff
        first = index + ((q - index) % num_processes)
        st = StreamState(process_index=q, num_processes=num_processes, epoch=epoch, window=window, index=first,
                         exclude=sorted(p for p in consumed_ahead if p[2] % num_processes == q),
                         skipped=skipped if q == 0 else {}, seen=seen if q == 0 else 0,
                         considered=considered if q == 0 else 0, bad_shards=list(bad_shards))
        new.append(st.to_json())
    return new
