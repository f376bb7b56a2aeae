"""The serving engine: requests from many clients batched into generations of the jitted decoder, their
answers streamed back while decoding goes on.

One worker thread owns the model. It takes the oldest waiting request and every other waiting request
with the same sampling settings (up to `max_batch`), generates them as one left-padded batch
(`Generator.decode`: the prefill, then jitted calls of `steps_per_call` decode steps each), and after every
call hands each row's new text to its request's `Stream`. Design choices, and why:

- **Batches form between generations, rows do not join a running one.** The KV cache of a batch is
  left-padded with one shared write slot, so a late row would need its prompt re-laid into a running
  cache; instead, requests that arrive while a batch runs wait (in a bounded queue) and form the next
  batch together. When the engine is idle it waits `batch_window` seconds after the first request for
  others to join. A long answer therefore delays newcomers by at most its own length; a short one
  finished early leaves its row idle (not recomputed: finished rows cost a masked step).
- **Short jitted chunks, not a host callback per token**: one compiled program per shape bucket (the
  chunk length is a traced limit), a host round trip every `steps_per_call` tokens (8 by default). A
  host callback would stream every token but costs a device→host sync per step of every row.
- **Bounded compiles**: batch sizes are padded to powers of two, prompt lengths and token budgets to
  the generator's buckets, so a server compiles at most a few programs per bucket whatever arrives.
- **Per-row independence**: each row has its own token budget and sampling stream (`Prompt.seed`), so
  what a client gets does not depend on who it was batched with (greedy answers equal
  `Generator.generate` of the prompt alone).
- **Stop strings across chunk borders**: each row's text is decoded from all its ids so far; a stop
  string is searched in the whole text, and the text sent is held back where it could still be the
  beginning of a stop string (or ends in an incomplete UTF-8 sequence, or in whitespace that a final
  strip would remove), so a client never receives text that is later cut.
- **A client that goes away frees its row** (`Stream.cancel`): the row is ended before the next call,
  and a batch whose rows are all ended stops. A waiting request that is cancelled never runs.
- **Slow clients never block the engine**: each stream is an unbounded queue (a request's tokens are
  bounded by its budget) that the worker only appends to.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import queue
import secrets
import threading
import time
from typing import Iterator, Sequence

import numpy as np

from owl_jax.chat import DEFAULT_STOP
from owl_jax.sampling import SamplingParams

log = logging.getLogger(__name__)


class EngineError(Exception):
    """A request the engine cannot take now; `status` is the HTTP status to answer with."""

    status = 503


class QueueFull(EngineError):
    status = 429


class EngineClosed(EngineError):
    status = 503


@dataclasses.dataclass(frozen=True)
class RequestSettings:
    """How one request is answered. Requests with equal `sampling` (and `stop_at_eos`) can share a batch;
    budgets, stop strings and seeds are per row. `seed` None: a fresh random one (sampling only)."""

    max_new_tokens: int = 512
    sampling: SamplingParams = SamplingParams()
    stop: tuple[str, ...] = DEFAULT_STOP
    seed: int | None = None
    stop_at_eos: bool = True


@dataclasses.dataclass(frozen=True)
class Finished:
    """The end of a request: the whole answer (the streamed deltas add up to it), and counts for `usage`.
    finish_reason: stop (EOS or a stop string) | length | cancelled."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class Stream:
    """The consumer side of one request: iterate (`for` or `async for`) for text deltas (str), then one
    `Finished`; an engine failure is raised. With a `loop` the events are delivered into that asyncio
    loop (thread-safe), else into a plain thread queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None):
        self._loop = loop
        self._queue: asyncio.Queue | queue.Queue = asyncio.Queue() if loop is not None else queue.Queue()
        self._cancelled = threading.Event()
        self.result: Finished | None = None

    def cancel(self) -> None:
        """Stop generating for this request (a client that went away); safe from any thread, idempotent."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def _put(self, event) -> None:
        if self._loop is None:
            self._queue.put(event)
            return
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # the consumer's loop is gone: nobody is listening
            self.cancel()

    def _take(self, event):
        if isinstance(event, BaseException):
            raise event
        if isinstance(event, Finished):
            self.result = event
        return event

    def __iter__(self) -> Iterator[str | Finished]:
        while self.result is None:
            yield self._take(self._queue.get())

    async def __aiter__(self):
        while self.result is None:
            yield self._take(await self._queue.get())

    def collect(self) -> Finished:
        for _ in self:
            pass
        return self.result

    async def acollect(self) -> Finished:
        async for _ in self:
            pass
        return self.result


def visible_text(full: str, stops: Sequence[str], final: bool) -> tuple[str, bool]:
    """(the part of `full` a client may be sent now, whether a stop string ended it).

    The text is cut before the first stop string. Unless it is final, a tail that could still grow into
    a stop string, an incomplete UTF-8 sequence (decoded as U+FFFD) and trailing whitespace are held
    back, so what is sent is always a prefix of the final answer (which is stripped, as
    `chat.clean_answer` strips)."""
    cuts = [full.index(s) for s in stops if s and s in full]
    if cuts:
        return full[:min(cuts)].strip(), True
    if final:
        return full.strip(), False
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(full)), hold, -1):
            if full.endswith(stop[:k]):
                hold = k
                break
    text = full[:len(full) - hold].rstrip("\ufffd")
    return text.strip(), False


class _Row:
    """One request inside a running batch: its text so far and what has been sent."""

    def __init__(self, stream: Stream, prompt, settings: RequestSettings, limit: int, tokenizer, eos: int):
        self.stream, self.prompt, self.settings, self.limit = stream, prompt, settings, limit
        self.tokenizer, self.eos = tokenizer, eos
        self.sent = ""
        self.checked = 0  # ids whose text held no stop string at the last look
        self.finished, self.reason = False, ""

    def update(self, row: np.ndarray, done: bool) -> bool:
        """Read this row's ids after a decode call; send new text; True when the row is finished."""
        ids = [int(t) for t in row if t >= 0]
        eos = self.eos in ids
        if eos:
            ids = ids[:ids.index(self.eos)]
        full = self.tokenizer.decode(ids)
        end = done or eos or len(ids) >= self.limit
        text, stopped = visible_text(full, self.settings.stop, final=end)
        count = len(ids)
        if stopped:  # the completion ends with the token that completed the stop string
            count = next((k for k in range(self.checked + 1, len(ids) + 1)
                          if any(s in self.tokenizer.decode(ids[:k]) for s in self.settings.stop if s)), len(ids))
        self.checked = len(ids)
        self._send(text)
        if stopped or end:
            reason = "stop" if stopped or eos else ("length" if len(ids) >= self.limit else "cancelled")
            self.finish(reason, text, count)
        return self.finished

    def _send(self, text: str) -> None:
        if text.startswith(self.sent) and len(text) > len(self.sent):
            self.stream._put(text[len(self.sent):])
            self.sent = text

    def finish(self, reason: str, text: str | None = None, count: int = 0) -> None:
        if self.finished:
            return
        self.finished, self.reason = True, reason
        if text is not None and not text.startswith(self.sent):
            log.warning("a streamed answer's text changed after it was sent; the final text differs from the deltas")
        self.stream._put(Finished(self.sent if text is None else text, reason, len(self.prompt.tokens), count))


@dataclasses.dataclass
class _Waiting:
    stream: Stream
    prompt: object
    settings: RequestSettings
    arrived: float

    @property
    def key(self):
        return self.settings.sampling, self.settings.stop_at_eos


class Engine:
    """Batches and streams requests for one `Generator` (see the module docstring). `start()` the worker,
    `submit()` prompts, `close()` at the end."""

    def __init__(self, generator, *, max_batch: int = 8, max_queue: int = 64, steps_per_call: int = 8,
                 batch_window: float = 0.01):
        if max_batch < 1 or max_queue < 1 or steps_per_call < 1:
            raise ValueError("max_batch, max_queue and steps_per_call must be >= 1")
        self.generator = generator
        self.max_batch, self.max_queue = max_batch, max_queue
        self.steps_per_call, self.batch_window = steps_per_call, batch_window
        self._waiting: collections.deque[_Waiting] = collections.deque()
        self._cv = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._running = 0
        self.batch_sizes: collections.Counter[int] = collections.Counter()  # requests per generation
        self.shapes: set[tuple[int, int, int]] = set()  # (batch, prompt, new-token) buckets generated
        self.finish_reasons: collections.Counter[str] = collections.Counter()

    # ------------------------------------------------------------------ client side
    def start(self) -> "Engine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="owl-serving-engine", daemon=True)
            self._thread.start()
        return self

    def submit(self, prompt, settings: RequestSettings, *, loop: asyncio.AbstractEventLoop | None = None) -> Stream:
        """Queue one prompt (`owl_jax.generate.Prompt`); QueueFull when `max_queue` requests already wait,
        EngineClosed after `close`."""
        if settings.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        stream = Stream(loop)
        with self._cv:
            if self._closed:
                raise EngineClosed("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"the server is busy: {len(self._waiting)} requests are waiting; retry later")
            self._waiting.append(_Waiting(stream, prompt, settings, time.monotonic()))
            self._cv.notify_all()
        return stream

    def load(self) -> dict:
        """Requests waiting and rows running now."""
        with self._cv:
            return {"waiting": len(self._waiting), "running": self._running}

    def close(self, timeout: float | None = 30.0) -> None:
        """Stop taking requests, end the running batch's rows, fail the waiting ones, join the worker."""
        with self._cv:
            self._closed = True
            waiting, self._waiting = list(self._waiting), collections.deque()
            self._cv.notify_all()
        for w in waiting:
            w.stream._put(EngineClosed("the server is shutting down"))
        if self._thread is not None:
            self._thread.join(timeout)

    # ------------------------------------------------------------------ the worker
    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._generate(batch)
            except Exception as e:  # a broken batch fails its requests, never the server
                log.exception("generation failed")
                for w in batch:
                    w.stream._put(RuntimeError(f"generation failed: {type(e).__name__}: {e}"))
            finally:
                with self._cv:
                    self._running = 0

    def _next_batch(self) -> list[_Waiting] | None:
        with self._cv:
            while True:
                while not self._waiting and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return None
                deadline = self._waiting[0].arrived + self.batch_window
                while not self._closed and len(self._waiting) < self.max_batch and time.monotonic() < deadline:
                    self._cv.wait(max(deadline - time.monotonic(), 0.0))
                if self._closed:
                    return None
                for w in [w for w in self._waiting if w.stream.cancelled]:  # never run
                    self._waiting.remove(w)
                    w.stream._put(Finished("", "cancelled", len(w.prompt.tokens), 0))
                    self.finish_reasons["cancelled"] += 1
                if not self._waiting:
                    continue
                key = self._waiting[0].key
                batch = [w for w in self._waiting if w.key == key][:self.max_batch]
                for w in batch:
                    self._waiting.remove(w)
                self._running = len(batch)
                return batch

    def _generate(self, batch: list[_Waiting]) -> None:
        from owl_jax.generate import GenerationSettings, _pow2, bucket
        gen = self.generator
        sampling, stop_at_eos = batch[0].key
        prompts, rows = [], []
        eos = gen.eos_id if stop_at_eos else -1
        for w in batch:
            limit = w.settings.max_new_tokens
            if w.prompt.max_new_tokens is not None:
                limit = min(limit, w.prompt.max_new_tokens)
            seed = w.settings.seed if w.settings.seed is not None else (
                secrets.randbits(31) if sampling.do_sample else 0)
            prompts.append(dataclasses.replace(w.prompt, max_new_tokens=limit, seed=seed))
            rows.append(_Row(w.stream, w.prompt, w.settings, limit, gen.tokenizer, eos))
        most = max(p.max_new_tokens for p in prompts)
        self.batch_sizes[len(batch)] += 1
        self.shapes.add((_pow2(len(batch)), bucket(max(len(p.tokens) for p in prompts), minimum=gen.min_prompt_bucket),
                         bucket(most, minimum=16)))
        settings = GenerationSettings(max_new_tokens=most, sampling=sampling, stop_strings=(), stop_at_eos=stop_at_eos)
        for progress in gen.decode(prompts, settings, steps_per_call=self.steps_per_call):
            for i, row in enumerate(rows):
                if row.finished:
                    continue
                if row.stream.cancelled:
                    progress.done[i] = True
                    row.finish("cancelled")
                elif row.update(progress.out[i], bool(progress.done[i])):
                    progress.done[i] = True
            with self._cv:
                self._running = sum(not r.finished for r in rows)
            if self._closed:
                for i, row in enumerate(rows):
                    progress.done[i] = True
                    row.finish("cancelled")
        for row in rows:  # the budget ran out in the last call
            row.finish("length")
            self.finish_reasons[row.reason] += 1
