"""Count XLA compilations, per function name.

A training run must compile its step once: a second compile means a shape, dtype, weak type or
sharding changed between steps (a silent 2x slowdown on a pod, or a recompile every step). JAX's C++
dispatch cache may hold several entries for one executable, so counting backend compile events is the
reliable measure.
"""

from __future__ import annotations

import collections
import contextlib
from typing import Iterator

import jax.monitoring

_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileCounter:
    def __init__(self):
        self.counts: collections.Counter[str] = collections.Counter()

    def _listener(self, event: str, duration: float, **kwargs) -> None:
        if event == _BACKEND_COMPILE_EVENT:
            self.counts[str(kwargs.get("fun_name", "?"))] += 1

    def __getitem__(self, fun_name: str) -> int:
        return self.counts[fun_name]

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@contextlib.contextmanager
def count_compiles() -> Iterator[CompileCounter]:
    """`with count_compiles() as c: ...; c["step"]` is how many times `step` was compiled inside."""
    counter = CompileCounter()
    jax.monitoring.register_event_duration_secs_listener(counter._listener)
    try:
        yield counter
    finally:
        jax.monitoring.unregister_event_duration_listener(counter._listener)
