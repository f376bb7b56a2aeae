"""Batched generation with a key/value cache, and the chat command line.

    python -m owl_jax.generate --checkpoint DIR [--image a.jpg ...] --prompt "What is in the picture?"
    python -m owl_jax.generate --checkpoint DIR [--image a.jpg] --interactive

`DIR` is a training run (or one of its step directories), an official mPLUG-Owl layout directory or a
`LlamaForCausalLM` directory (text only), a llava-hf or original LLaVA directory; see `owl_jax.loading`. The
prompt is asked in the model's conversation template (`data.template`; mPLUG-Owl's: images first, one
`Human: <image>` line each; LLaVA's `vicuna_v1`: `USER: <image>\n... ASSISTANT:`), and the answer printed.

How a batch is generated (`Generator.generate`):

1. Prompts are left-padded to a bucketed length P (64, 128, 256, then multiples of 256), images to a
   power-of-two budget and the batch to a power of two, so that a session compiles a handful of times,
   not once per prompt (the official system prompt alone is ~110 LLaMA tokens: few prompts are short).
   RoPE positions start at each row's first real token, and attention never sees padding, so a padded
   row generates what its prompt generates alone.
2. Prefill (one jitted call): images through the vision tower and abstractor, spliced at their slots,
   the whole prompt through the decoder, keys/values written to a preallocated cache
   [layers, batch, P + N, kv_heads, head_dim] (N: the largest row budget, bucketed), logits of the last slot.
3. Decode (jitted `lax.while_loop` over steps, static shapes): process the logits (repetition penalty,
   no-repeat-n-gram, then greedy or temperature / top-k / top-p sampling; see `owl_jax.sampling`), write
   the token, run it through the decoder against the cache, until every row met EOS or its own budget
   (`Prompt.max_new_tokens`, a traced per-row limit: one long prompt with little room left in the
   context does not shorten the other answers of its batch). Calls
   run `steps_per_call` steps at a time when stop strings are set, so the host can check the decoded
   text between calls and finish rows that produced one.

LoRA adapters are applied unmerged (the model's own Dense layers) or merged beforehand
(`owl_jax.loading.load_for_inference(merge_lora=True)`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from owl_jax.models.kv_cache import forward_with_cache
from owl_jax.sampling import SamplingParams, choose, process_logits


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One prompt: token ids with `tokens_per_image` ids of -1 per image, and its images in order
    ([n, H, W, 3] CLIP-normalised; None or an empty array without images).

    `max_new_tokens`: this row's own budget (e.g. the room its context leaves, `ChatSession.prompt` sets
    it); the row stops at min(this, `GenerationSettings.max_new_tokens`) whatever the other rows of the
    batch allow, so an answer never depends on what it is batched with. `seed`: the row's sampling stream
    (default: its index in the batch); give a stable per-question value (evaluation does) to make sampled
    answers independent of batching too.

    `qformer_tokens`: for a model whose Q-Former reads the instruction (InstructBLIP), each image's
    instruction ids (one 1-D array per image, in order, at most the Q-Former's `max_text_len`), as the
    training pipeline's `qformer_tokens` give them; `ChatSession.prompt` fills it in."""

    tokens: np.ndarray
    pixels: np.ndarray | None = None
    max_new_tokens: int | None = None
    seed: int | None = None
    qformer_tokens: tuple[np.ndarray, ...] | None = None

    @property
    def num_images(self) -> int:
        return 0 if self.pixels is None else int(len(self.pixels))


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 512
    sampling: SamplingParams = SamplingParams()
    stop_strings: tuple[str, ...] = ()
    stop_at_eos: bool = True
    seed: int = 0


@dataclasses.dataclass
class DecodeProgress:
    """The decode state after one jitted call of `Generator.decode`: `step` tokens generated per row so
    far, `out` [B, N] their ids (-1 where none: past a row's end; EOS included), `done` [B] the rows that
    are finished (EOS, budget, filler rows); set `done[i]` to end row i before the next call."""

    step: int
    out: np.ndarray
    done: np.ndarray


@dataclasses.dataclass(frozen=True)
class Generation:
    tokens: list[int]  # the generated ids, EOS excluded
    text: str  # their text, cut before the first stop string
    finish_reason: str  # eos | stop | length


def bucket(n: int, *, minimum: int = 16, step: int = 256) -> int:
    """The padded size for n: the next power of two (at least `minimum`) up to `step`, then the next
    multiple of `step`. With minimum 64, prompts of up to 2048 tokens use at most 10 sizes."""
    size = minimum
    while size < n and size < step:
        size *= 2
    return size if size >= n else -(-n // step) * step


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class Generator:
    """Generation from one model (in eval mode). Compiled code is shared by every model of the same
    architecture; a session compiles once per (batch, prompt, new-token) bucket and sampling mode."""

    def __init__(self, model: nnx.Module, tokenizer, *, tokens_per_image: int, image_size: int,
                 eos_id: int | None = None, steps_per_call: int = 32, min_prompt_bucket: int = 64):
        model.eval()
        self.graphdef, self.state = nnx.split(model)
        self.tokenizer = tokenizer
        self.tokens_per_image, self.image_size = tokens_per_image, image_size
        self.eos_id = tokenizer.eos_id if eos_id is None else eos_id
        self.pad_id = max(int(tokenizer.pad_id), 0)
        self.vocab_size = model.language_model.embed_tokens[...].shape[0]
        # Ids the tokenizer cannot decode (an embedding table padded beyond the vocabulary) are never chosen.
        self.token_limit = min(self.vocab_size, int(tokenizer.vocab_size))
        self.steps_per_call, self.min_prompt_bucket = steps_per_call, min_prompt_bucket
        # InstructBLIP: every image's instruction goes to the Q-Former too, padded to one length (one program).
        connector = getattr(model, "connector", None)
        self.qformer_text_len = connector.max_text_len if getattr(connector, "text_input", False) else 0

    # ------------------------------------------------------------------ host-side batch layout
    def _batch(self, prompts: Sequence[Prompt]) -> dict[str, np.ndarray]:
        from owl_jax.models.splice import plan_image_slots
        if not prompts:
            raise ValueError("no prompts")
        lengths = np.asarray([len(p.tokens) for p in prompts])
        if lengths.min() < 1:
            raise ValueError("empty prompt")
        b, p = _pow2(len(prompts)), bucket(int(lengths.max()), minimum=self.min_prompt_bucket)
        lengths = np.concatenate([lengths, np.ones(b - len(prompts), lengths.dtype)])  # filler rows: 1 token
        pad = (p - lengths).astype(np.int32)
        tokens = np.full((b, p), self.pad_id, np.int32)
        for i, prompt in enumerate(prompts):
            tokens[i, pad[i]:] = prompt.tokens
        positions = np.maximum(np.arange(p, dtype=np.int32)[None] - pad[:, None], 0)
        batch = {"tokens": tokens, "positions": positions, "pad": pad, "lengths": lengths.astype(np.int32)}
        num_images = np.asarray([pr.num_images for pr in prompts] + [0] * (b - len(prompts)))
        if num_images.sum():
            budget = _pow2(int(num_images.sum()))
            pixels = np.zeros((budget, self.image_size, self.image_size, 3), np.float32)
            pixels[:num_images.sum()] = np.concatenate([pr.pixels for pr in prompts if pr.num_images])
            batch["pixel_values"] = pixels
            batch["image_index"] = plan_image_slots(tokens, num_images, tokens_per_image=self.tokens_per_image,
                                                    image_budget=budget)
            if self.qformer_text_len:
                batch["qformer_tokens"] = self._qformer_tokens(prompts, budget)
        elif (tokens < 0).any():
            raise ValueError("a prompt has image slots but no images")
        return batch

    def _qformer_tokens(self, prompts: Sequence[Prompt], budget: int) -> np.ndarray:
        """[budget, max_text_len] each image slot's instruction ids (-1 padding), in the order of the pixels."""
        out = np.full((budget, self.qformer_text_len), -1, np.int32)
        slot = 0
        for i, prompt in enumerate(prompts):
            if not prompt.num_images:
                continue
            ids = prompt.qformer_tokens
            if ids is None or len(ids) != prompt.num_images:
                raise ValueError(f"prompt {i}: this model's Q-Former reads each image's instruction; give "
                                 f"qformer_tokens for its {prompt.num_images} image(s) (ChatSession.prompt does)")
            for row in ids:
                row = np.asarray(row, np.int32)
                if len(row) > self.qformer_text_len:
                    raise ValueError(f"prompt {i}: an instruction of {len(row)} Q-Former tokens exceeds its "
                                     f"max_text_len {self.qformer_text_len}")
                out[slot, :len(row)] = row
                slot += 1
        return out

    def next_token_logits(self, prompts: Sequence[Prompt]) -> np.ndarray:
        """[len(prompts), V] float32 logits of the first generated position (no processing)."""
        batch = self._batch(prompts)
        logits, _ = _prefill_jit(self.state, _model_inputs(batch), graphdef=self.graphdef,
                                 cache_len=batch["tokens"].shape[1] + bucket(1))
        return np.asarray(logits)[:len(prompts)]

    # ------------------------------------------------------------------ generation
    def generate(self, prompts: Sequence[Prompt], settings: GenerationSettings = GenerationSettings()) -> list[Generation]:
        """One Generation per prompt. Row i stops at EOS, a stop string or after min(prompts[i].max_new_tokens,
        settings.max_new_tokens) tokens, and (when sampling) draws from the stream of (settings.seed,
        prompts[i].seed or i): what the other rows are changes nothing in it."""
        stopped = np.zeros(_pow2(max(len(prompts), 1)), bool)
        eos = self.eos_id if settings.stop_at_eos else -1
        chunk = self.steps_per_call if settings.stop_strings else None
        for progress in self.decode(prompts, settings, steps_per_call=chunk):
            if settings.stop_strings:
                for i in np.flatnonzero(~progress.done[:len(prompts)]):
                    text = self.tokenizer.decode(_tokens(progress.out[i], eos))
                    if any(stop in text for stop in settings.stop_strings):
                        progress.done[i] = stopped[i] = True
        return [self._finish(progress.out[i], settings, stopped[i]) for i in range(len(prompts))]

    def decode(self, prompts: Sequence[Prompt], settings: GenerationSettings,
               steps_per_call: int | None = None) -> Iterator["DecodeProgress"]:
        """The decode loop of `generate`, one `DecodeProgress` after each jitted call of `steps_per_call`
        steps (None: one call for the whole budget). Streaming callers (`owl_jax.serving`) read the new ids
        of each row between calls and may end rows (`progress.done[i] = True`: a stop string, a client that
        went away); every call runs the same compiled program, whatever the chunk size. Stop strings of
        `settings` are not checked here (`generate` checks them)."""
        if settings.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {settings.max_new_tokens}")
        most = settings.max_new_tokens
        limits = [most if pr.max_new_tokens is None else min(pr.max_new_tokens, most) for pr in prompts]
        if min(limits, default=1) < 1:
            raise ValueError(f"prompt {int(np.argmin(limits))} allows no new tokens (max_new_tokens {min(limits)})")
        batch = self._batch(prompts)
        b, p = batch["tokens"].shape
        max_steps = max(limits)
        n = bucket(max_steps, minimum=16)
        logits, cache = _prefill_jit(self.state, _model_inputs(batch), graphdef=self.graphdef, cache_len=p + n)
        s = settings.sampling
        history = np.full((b, p + n), -1, np.int32)
        seen = np.zeros((b, self.vocab_size), bool)
        if s.penalize_prompt:
            text = np.where(np.arange(p)[None] >= batch["pad"][:, None], batch["tokens"], -1)
            history[:, :p] = np.where(text >= 0, text, -1)
            rows, cols = np.nonzero(text >= 0)
            seen[rows, text[rows, cols]] = True
        done = np.arange(b) >= len(prompts)
        # Per-row budgets and sampling streams are traced [B] arrays: no compile per value.
        row_limits = np.asarray(limits + [1] * (b - len(prompts)), np.int32)
        row_seeds = np.asarray([i if pr.seed is None else pr.seed for i, pr in enumerate(prompts)]
                               + list(range(len(prompts), b)), np.int64).astype(np.uint32)
        carry = {"cache": cache, "logits": logits, "step": np.int32(0), "out": np.full((b, n), -1, np.int32),
                 "done": done, "seen": seen, "history": history, "pad": batch["pad"], "lengths": batch["lengths"]}
        eos = self.eos_id if settings.stop_at_eos else -1
        consts = {**s.arrays(), "eos": np.int32(eos), "seed": np.uint32(settings.seed & 0xFFFFFFFF),
                  "row_seeds": row_seeds, "row_limits": row_limits, "vocab": np.int32(self.token_limit)}
        carry = _placed_like(carry, logits)
        chunk = steps_per_call or max_steps
        while True:
            limit = np.int32(min(int(carry["step"]) + chunk, max_steps))
            carry = _decode_jit(self.state, carry, consts, limit, graphdef=self.graphdef, do_sample=s.do_sample,
                                ngram=s.no_repeat_ngram_size, prompt_len=p)
            # Host copies: the next call donates the carry's buffers.
            progress = DecodeProgress(int(carry["step"]), np.array(carry["out"]), np.array(carry["done"]))
            yield progress
            carry["done"] = progress.done
            if progress.done.all() or progress.step >= max_steps:
                return

    def _finish(self, row: np.ndarray, settings: GenerationSettings, stopped: bool) -> Generation:
        row = row[row >= 0]
        tokens = _tokens(row, self.eos_id if settings.stop_at_eos else -1)
        text = self.tokenizer.decode(tokens)
        cuts = [text.index(stop) for stop in settings.stop_strings if stop in text]
        if cuts:
            return Generation(tokens, text[:min(cuts)], "stop")
        reason = "eos" if len(tokens) < len(row) else ("stop" if stopped else "length")
        return Generation(tokens, text, reason)


def _placed_like(carry: dict, reference: jax.Array) -> dict:
    """The host leaves of the first decode carry placed (replicated) on the mesh of the prefill's output,
    where the carry of every later call lives (a training run's model is on a mesh): otherwise the first
    call of a chunked decode compiles a program of its own. `done` stays a host array: the caller sets it
    between calls."""
    sharding = reference.sharding
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return carry
    replicated = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    return {k: v if k == "done" or isinstance(v, jax.Array) else jax.device_put(v, replicated)
            for k, v in carry.items()}


def _tokens(row: np.ndarray, eos: int) -> list[int]:
    """Generated ids of one output row up to (not including) EOS."""
    ids = [int(t) for t in row if t >= 0]
    return ids[:ids.index(eos)] if eos in ids else ids


def _model_inputs(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    keys = ("tokens", "positions", "pad", "pixel_values", "image_index", "qformer_tokens")
    return {k: batch[k] for k in keys if k in batch}


# ---------------------------------------------------------------------- jitted parts


def _prefill(state, batch, *, graphdef, cache_len: int):
    """(logits of the last slot [B, V] float32, cache) of a left-padded prompt batch."""
    from owl_jax.models.kv_cache import init_cache
    model = nnx.merge(graphdef, state)
    lm = model.language_model
    tokens = batch["tokens"]
    embeds = model.embed_inputs(tokens, batch.get("pixel_values"), batch.get("image_index"),
                                batch.get("qformer_tokens"))
    cache = init_cache(lm, tokens.shape[0], cache_len)
    hidden, cache = forward_with_cache(lm, embeds, batch["positions"], cache, pad=batch["pad"], write_slot=0,
                                       attend_to_cache=False)
    return lm.logits(hidden[:, -1]), cache


def _decode(state, carry, consts, limit, *, graphdef, do_sample: bool, ngram: int, prompt_len: int):
    """Run decode steps from `carry["step"]` until `limit` or until every row is done."""
    model = nnx.merge(graphdef, state)
    lm = model.language_model
    arrays = {k: consts[k] for k in ("temperature", "top_k", "top_p", "repetition_penalty")}
    base_key = jax.random.key(consts["seed"])
    row_keys = jax.vmap(lambda r: jax.random.fold_in(base_key, r))(consts["row_seeds"])  # one stream per row
    b = carry["out"].shape[0]
    vocab = carry["seen"].shape[1]

    def cond(c):
        return (c["step"] < limit) & ~jnp.all(c["done"])

    def body(c):
        step, done = c["step"], c["done"]
        end = prompt_len + step
        scores = process_logits(c["logits"], seen=c["seen"], history=c["history"], end=end, arrays=arrays,
                                no_repeat_ngram_size=ngram)
        scores = jnp.where(jnp.arange(vocab) < consts["vocab"], scores, -jnp.inf)
        keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(row_keys)
        token = choose(scores, keys, arrays=arrays, do_sample=do_sample)
        written = jnp.where(done, -1, token)
        out = jax.lax.dynamic_update_slice(c["out"], written[:, None], (0, step))
        history = jax.lax.dynamic_update_slice(c["history"], written[:, None], (0, end))
        seen = c["seen"].at[jnp.arange(b), jnp.where(done, vocab, token)].set(True, mode="drop")
        done = done | (token == consts["eos"]) | (step + 1 >= consts["row_limits"])  # each row's own budget
        embeds = lm.embed(token[:, None])
        positions = (c["lengths"] + step)[:, None]
        hidden, cache = forward_with_cache(lm, embeds, positions, c["cache"], pad=c["pad"], write_slot=end,
                                           attend_to_cache=True)
        return {**c, "cache": cache, "logits": lm.logits(hidden[:, 0]), "step": step + 1, "out": out,
                "done": done, "seen": seen, "history": history}

    return jax.lax.while_loop(cond, body, carry)


# Module-level (not per Generator): models with the same graph definition (architecture) share compiled
# code, e.g. the generators that evaluation builds for several tasks.
_prefill_jit = jax.jit(_prefill, static_argnames=("graphdef", "cache_len"))
_decode_jit = jax.jit(_decode, static_argnames=("graphdef", "do_sample", "ngram", "prompt_len"),
                      donate_argnames=("carry",))


# ---------------------------------------------------------------------- command line


def add_generation_arguments(parser: argparse.ArgumentParser, *, max_new_tokens: int = 512) -> None:
    """Sampling options shared by this CLI and `owl_jax.evaluate`."""
    g = parser.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    g.add_argument("--preset", choices=("greedy", "official-demo"), default="greedy",
                   help="greedy (default), or the official demo's sampling: top-k 3, top-p 0.9, no-repeat-ngram 2; "
                        "the options below override it")
    g.add_argument("--sample", action="store_true", default=None, help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float)
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--repetition-penalty", type=float)
    g.add_argument("--no-repeat-ngram", type=int, dest="no_repeat_ngram_size")
    g.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop when the answer contains TEXT (repeatable; default: the conversation template's stop "
                        "strings, e.g. a new 'Human:' / 'AI:' turn)")
    g.add_argument("--seed", type=int, default=0)


def settings_from_args(args: argparse.Namespace) -> GenerationSettings:
    from owl_jax.chat import DEFAULT_STOP
    from owl_jax.sampling import OFFICIAL_DEMO
    base = OFFICIAL_DEMO if args.preset == "official-demo" else SamplingParams()
    changes = {k: v for k, v in (("do_sample", args.sample), ("temperature", args.temperature),
                                 ("top_k", args.top_k), ("top_p", args.top_p),
                                 ("repetition_penalty", args.repetition_penalty),
                                 ("no_repeat_ngram_size", args.no_repeat_ngram_size)) if v is not None}
    sampling = dataclasses.replace(base, **changes)
    stops = tuple(args.stop) if args.stop is not None else DEFAULT_STOP
    return GenerationSettings(max_new_tokens=args.max_new_tokens, sampling=sampling,
                              stop_strings=tuple(s for s in stops if s), seed=args.seed)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="training run directory (or RUN/checkpoints/STEP), official mPLUG-Owl, LLaVA (llava-hf or original) or LLaMA HF directory")
    parser.add_argument("--tokenizer", help="tokenizer to use instead of the checkpoint's (file, folder or toy:VOCAB)")
    parser.add_argument("--qformer-tokenizer",
                        help="InstructBLIP: the Q-Former's BERT tokenizer (tokenizer.json, vocab.txt or a folder) "
                             "instead of the run's data.qformer_tokenizer or the directory's qformer_tokenizer/")
    parser.add_argument("--lora", help="PEFT LoRA adapter directory to apply (Hugging Face directories)")
    parser.add_argument("--merge-lora", action="store_true", help="fold LoRA adapters into the weights first")
    parser.add_argument("--scan-layers", action="store_true",
                        help="stack the layers of a Hugging Face directory's model (faster compiles for deep models)")
    parser.add_argument("--system-prompt", default=None,
                        help="system prompt of the conversation (default: the run's data.system_prompt, else the official one)")


def generator_for(loaded) -> Generator:
    cfg = loaded.config.model
    return Generator(loaded.model, loaded.tokenizer, tokens_per_image=cfg.tokens_per_image,
                     image_size=cfg.vision.image_size)


def main(argv: Sequence[str] | None = None) -> int:
    from owl_jax.chat import ChatError, ChatSession, command_list, interactive, load_image, newline_warning
    from owl_jax.loading import LoadError, load_for_inference
    parser = argparse.ArgumentParser(prog="python -m owl_jax.generate", description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--image", action="append", default=[], help="image file (repeatable; in order)")
    from data_pipelines.templates import TEMPLATES
    parser.add_argument("--template", choices=list(TEMPLATES), default=None,
                        help="conversation template (default: the run's data.template; a Hugging Face directory: "
                             "its family's, LLaVA vicuna_v1)")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--prompt", help="the question; the answer is printed")
    mode.add_argument("--interactive", action="store_true",
                      help=f"multi-turn chat on stdin (commands: {command_list()})")
    add_generation_arguments(parser)
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be at least 1")
    missing = [path for path in args.image if not os.path.isfile(path)]
    if missing:  # before the (slow) model load
        print(f"error: image {missing[0]} not found", file=sys.stderr)
        return 2
    try:
        settings = settings_from_args(args)
    except ValueError as e:  # an impossible sampling setting (SamplingParams says which)
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        loaded = load_for_inference(args.checkpoint, tokenizer=args.tokenizer, lora=args.lora,
                                    merge_lora=args.merge_lora, scan_layers=args.scan_layers, template=args.template,
                                    qformer_tokenizer=args.qformer_tokenizer)
        if (warning := newline_warning(loaded.tokenizer)) is not None:
            print(f"warning: {warning}", file=sys.stderr)
        chat = ChatSession.for_config(loaded.config, loaded.tokenizer, system=args.system_prompt)
        if args.stop is None:  # the template's own stop strings
            settings = dataclasses.replace(settings, stop_strings=chat.stop_strings)
        images = tuple(load_image(path, loaded) for path in args.image)
        for pixels in images:
            chat.add_image(pixels)
        generator = generator_for(loaded)
        if args.interactive:
            return interactive(chat, generator, settings, loaded, images=images)
        print(chat.answer(generator, args.prompt, settings))
    except (LoadError, ChatError) as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
