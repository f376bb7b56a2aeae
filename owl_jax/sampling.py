"""Choosing the next token: the logits processors of Hugging Face `generate`, in its order and semantics.

Order (as `GenerationMixin._get_logits_processor` applies them): repetition penalty, no-repeat-n-gram,
then, when sampling, temperature, top-k, top-p, and a draw from the softmax; greedy takes the argmax of the
processed logits. Each processor here equals its transformers counterpart (`RepetitionPenaltyLogitsProcessor`,
`NoRepeatNGramLogitsProcessor`, `TemperatureLogitsWarper`, `TopKLogitsWarper`, `TopPLogitsWarper`, with
`min_tokens_to_keep=1`), so settings carry over from PyTorch demos unchanged.

Everything but `do_sample` and `no_repeat_ngram_size` is a traced value (`SamplingParams.arrays`), so
changing temperature, top-k, top-p or the penalty never recompiles the decode loop.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. Defaults: greedy, no penalties.

    top_k 0 and top_p 1.0 switch those filters off; repetition_penalty 1.0 and no_repeat_ngram_size 0
    switch the penalties off. `penalize_prompt`: whether the prompt's text tokens count for the penalties
    (Hugging Face `LlamaForCausalLM.generate` semantics: its `input_ids` include the prompt) or only the
    generated ones (the official mPLUG-Owl, which passes the prompt as embeddings).
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    penalize_prompt: bool = False

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature} (use do_sample=False for greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0 or self.no_repeat_ngram_size < 0:
            raise ValueError("top_k and no_repeat_ngram_size must be >= 0")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    def arrays(self) -> dict[str, np.ndarray]:
        """The traced settings (host arrays: passing them never triggers a compile)."""
        return {"temperature": np.float32(self.temperature), "top_k": np.int32(self.top_k),
                "top_p": np.float32(self.top_p), "repetition_penalty": np.float32(self.repetition_penalty)}


#: The official mPLUG-Owl demo's sampling (DESIGN.md §2).
OFFICIAL_DEMO = SamplingParams(do_sample=True, top_k=3, top_p=0.9, no_repeat_ngram_size=2)


def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: jax.Array) -> jax.Array:
    """Tokens already `seen` ([B, V] bool): negative logits multiplied by `penalty`, positive divided.
    A penalty of 1 is the identity exactly."""
    penalised = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(seen, penalised, logits)


def banned_ngram_tokens(history: jax.Array, end: jax.Array | int, n: int, vocab_size: int) -> jax.Array:
    """[B, V] bool: tokens that would complete an n-gram already present in `history`.

    `history` [B, L] holds token ids with -1 where there is no token (padding, image slots, the future);
    the current sequence ends before column `end` (the same for every row). An n-gram counts only when
    all its n entries are tokens, and the last n-1 tokens must all be tokens too, which is what Hugging
    Face's processor sees for an unpadded sequence (it bans nothing before n-1 tokens exist).
    """
    b, length = history.shape
    last = jax.lax.dynamic_slice_in_dim(history, end - (n - 1), n - 1, axis=1) if n > 1 else history[:, :0]
    windows = jnp.stack([history[:, j:length - n + 1 + j] for j in range(n)], axis=-1)  # [B, W, n]
    starts = jnp.arange(length - n + 1)
    valid = jnp.all(windows >= 0, axis=-1) & (starts[None] + n <= end)
    prefix_ok = jnp.all(last >= 0, axis=-1)[:, None] & (end >= n - 1)
    match = valid & prefix_ok & jnp.all(windows[..., :n - 1] == last[:, None, :], axis=-1)
    target = jnp.where(match, windows[..., n - 1], vocab_size)  # vocab_size: dropped by the scatter
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], target.shape)
    return jnp.zeros((b, vocab_size), bool).at[rows, target].set(True, mode="drop")


def top_k_filter(logits: jax.Array, k: jax.Array) -> jax.Array:
    """Logits below the k-th largest set to -inf (ties with it kept); k <= 0 keeps everything."""
    descending = -jnp.sort(-logits, axis=-1)
    kth = jax.lax.dynamic_index_in_dim(descending, jnp.clip(k - 1, 0, logits.shape[-1] - 1), axis=-1)
    kth = jnp.where(k > 0, kth, -jnp.inf)
    return jnp.where(logits < kth, -jnp.inf, logits)


def top_p_filter(logits: jax.Array, p: jax.Array) -> jax.Array:
    """Nucleus filter: drop the lowest-probability tokens whose cumulative probability (ascending) is at
    most 1 - p, always keeping the most likely token; p = 1 keeps everything."""
    order = jnp.argsort(logits, axis=-1)
    ascending = jnp.take_along_axis(logits, order, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
    remove_sorted = (cumulative <= 1 - p).at[:, -1].set(False)
    remove = jnp.zeros_like(remove_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(remove_sorted)
    return jnp.where(remove & (p < 1), -jnp.inf, logits)


def process_logits(logits: jax.Array, *, seen: jax.Array, history: jax.Array, end: jax.Array | int,
                   arrays: dict[str, jax.Array], no_repeat_ngram_size: int) -> jax.Array:
    """The penalties (before the greedy / sampling choice), in float32."""
    logits = apply_repetition_penalty(logits.astype(jnp.float32), seen, arrays["repetition_penalty"])
    if no_repeat_ngram_size > 0:
        banned = banned_ngram_tokens(history, end, no_repeat_ngram_size, logits.shape[-1])
        logits = jnp.where(banned, -jnp.inf, logits)
    return logits


def choose(logits: jax.Array, keys: jax.Array, *, arrays: dict[str, jax.Array], do_sample: bool) -> jax.Array:
    """[B] next tokens from processed logits: argmax, or a draw after temperature / top-k / top-p.

    `keys` [B] are per-row random keys: a row's draw depends on its own key only, not on the batch size
    or its place in the batch (one key split over [B, V] would tie every row to the batch shape)."""
    if not do_sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scores = logits / arrays["temperature"]
    scores = top_p_filter(top_k_filter(scores, arrays["top_k"]), arrays["top_p"])
    return jax.vmap(lambda k, row: jax.random.categorical(k, row))(keys, scores).astype(jnp.int32)
