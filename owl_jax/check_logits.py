"""`python -m owl_jax.check_logits`: does owl-jax compute what transformers computes for this checkpoint?

    python -m owl_jax.check_logits --checkpoint DIR [--reference HF_DIR] [--images a.jpg ...] [--prompt TEXT]
        [--atol 1e-4] [--tokenizer SPEC] [--length N] [--seed S]

The conversion gate to run after an import or an export: `DIR` is anything owl-jax loads (a training run or
one of its steps, an export, a llava-hf / blip2-hf / instructblip-hf / `LlamaForCausalLM` / original LLaVA
directory; see `owl_jax.loading`); `--reference` is the Hugging Face directory whose transformers class gives
the expected logits (`LlavaForConditionalGeneration` for llava-hf, `Blip2ForConditionalGeneration` /
`InstructBlipForConditionalGeneration` for blip2-hf / instructblip-hf — an InstructBLIP Q-Former reads the
same deterministic random instruction ids on both sides —, `LlamaForCausalLM` for a LLaMA directory: then the
language model alone is compared), by default `DIR` itself when that is one. Both run the same inputs in
float32 on the CPU: the `--prompt` in the model's conversation template with the `--images` (owl-jax's
preprocessing, the same pixels to both), or without a prompt deterministic random token ids (`--length`,
`--seed`) around the images (deterministic random pixels when none are given). It prints the largest
absolute logit difference (and where), the mean KL divergence KL(reference || owl-jax) per position and
the top-1 agreement, and exits 1 above `--atol`, naming the parameters that differ from the reference's
when the reference loads into owl-jax too. The official mPLUG-Owl layout has no transformers class (its
reference is the official code: `tests/test_golden.py`); for it, and for the original LLaVA layout, the
tool says so. Mistakes (missing files, a reference that is not an HF directory, inputs the reference
cannot take) exit 2 with one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

#: The transformers class that computes the reference logits of each Hugging Face directory kind.
REFERENCE_CLASSES = {"llava-hf": "LlavaForConditionalGeneration", "hf-llama": "LlamaForCausalLM",
                     "blip2-hf": "Blip2ForConditionalGeneration",
                     "instructblip-hf": "InstructBlipForConditionalGeneration"}
#: The kinds whose image slots are the model's `image_token_index` ids in transformers' input_ids.
_IMAGE_TOKEN_KINDS = ("llava-hf", "blip2-hf", "instructblip-hf")
#: Instruction tokens per image that check_logits gives an InstructBLIP Q-Former (random ids, both sides).
QFORMER_TEXT_LEN = 8
_NO_CLASS = {
    "mplug-owl": "the official mPLUG-Owl layout has no transformers class (transformers has no mPLUG-Owl "
                 "model); its reference is the official PyTorch code, which tests/test_golden.py compares against",
    "llava-original": "an original LLaVA checkpoint has no transformers class (LlavaLlamaForCausalLM lives in the "
                      "LLaVA repository); export it with --format llava-hf and compare against that",
    "run": "a training run has no transformers class; pass an HF directory as --reference (e.g. its export)",
}


class CheckError(Exception):
    """A user mistake; one line, exit status 2."""


@dataclasses.dataclass
class Inputs:
    tokens: np.ndarray         # [T] int32, image slots -1
    pixels: np.ndarray | None  # [n, S, S, 3] float32 CLIP-normalised
    description: str
    qformer_tokens: np.ndarray | None = None  # [n, L] int32 (InstructBLIP's Q-Former instruction), no padding


@dataclasses.dataclass
class Comparison:
    max_abs: float
    position: int
    token: int
    kl: float
    top1: float

    def passed(self, atol: float) -> bool:
        return bool(self.max_abs <= atol)


def compare(ours: np.ndarray, reference: np.ndarray) -> Comparison:
    """Largest |ours - reference| over [T, V] logits (and where), mean KL(reference || ours) per position
    and the fraction of positions with the same top-1 token."""
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    diff = np.abs(ours - reference)
    t, v = np.unravel_index(int(np.argmax(diff)), diff.shape)

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lq = log_softmax(reference), log_softmax(ours)
    kl = float(np.mean(np.sum(np.exp(lp) * (lp - lq), -1)))
    top1 = float(np.mean(ours.argmax(-1) == reference.argmax(-1)))
    return Comparison(float(diff[t, v]), int(t), int(v), kl, top1)


# ---------------------------------------------------------------------- the two sides


def _float32(loaded):
    """The loaded model in float32 (parameters and compute), whatever dtypes its run used."""
    from owl_jax.convert.state import assign_canonical_params, canonical_params
    from owl_jax.loading import _allocate
    m = loaded.config.model
    if m.dtype == m.param_dtype == "float32" and m.frozen_param_dtype in ("", "float32"):
        return loaded.model
    cfg = dataclasses.replace(m, dtype="float32", param_dtype="float32", frozen_param_dtype="")
    model = _allocate(cfg)
    assign_canonical_params(model, {k: np.asarray(v, np.float32) for k, v in canonical_params(loaded.model).items()})
    model.eval()
    return model


def owl_logits(model, inputs: Inputs, tokens_per_image: int) -> np.ndarray:
    """[T, V] float32 logits of owl-jax on one sequence."""
    import jax.numpy as jnp
    from flax import nnx
    from owl_jax.models.splice import plan_image_slots
    tokens = inputs.tokens[None].astype(np.int32)
    kwargs = {}
    if inputs.pixels is not None and len(inputs.pixels):
        n = len(inputs.pixels)
        kwargs["image_index"] = jnp.asarray(plan_image_slots(tokens, np.asarray([n]), tokens_per_image=tokens_per_image,
                                                            image_budget=n))
        kwargs["pixel_values"] = jnp.asarray(inputs.pixels, jnp.float32)
        if inputs.qformer_tokens is not None:
            kwargs["qformer_tokens"] = jnp.asarray(inputs.qformer_tokens, jnp.int32)
    out = nnx.jit(lambda m, t, kw: m.logits(t, **kw))(model, jnp.asarray(tokens), kwargs)
    return np.asarray(out[0], np.float32)


def _hf_config(directory: Path) -> dict:
    return json.loads((directory / "config.json").read_text())


def reference_logits(directory: Path, kind: str, inputs: Inputs) -> np.ndarray:
    """[T, V] float32 logits of the transformers class of `directory` on the same sequence."""
    try:
        import torch
        import transformers
    except ImportError as e:
        raise CheckError(f"the reference side needs torch and transformers ({e.name} is missing): "
                         f"pip install -e \".[test]\"") from None
    cls = getattr(transformers, REFERENCE_CLASSES[kind])
    try:
        model = cls.from_pretrained(str(directory), dtype=torch.float32, local_files_only=True,
                                    attn_implementation="eager").eval()
    except (OSError, ValueError, KeyError) as e:
        raise CheckError(f"transformers cannot load {directory} as {cls.__name__}: {str(e).splitlines()[0]}") from None
    ids = inputs.tokens.astype(np.int64).copy()
    kwargs = {}
    if kind in _IMAGE_TOKEN_KINDS:
        config = model.config
        ids[ids < 0] = int(getattr(config, "image_token_id", None) or config.image_token_index)
        if inputs.pixels is not None and len(inputs.pixels):
            kwargs["pixel_values"] = torch.from_numpy(np.ascontiguousarray(inputs.pixels.transpose(0, 3, 1, 2)))
        if inputs.qformer_tokens is not None:
            kwargs["qformer_input_ids"] = torch.from_numpy(inputs.qformer_tokens.astype(np.int64))
            kwargs["qformer_attention_mask"] = torch.ones_like(kwargs["qformer_input_ids"])
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids[None]), **kwargs).logits
    return out[0].float().numpy()


# ---------------------------------------------------------------------- inputs


def make_inputs(args, loaded, *, text_only: bool, image_token: int | None, vocab: int) -> Inputs:
    """The sequence both sides run: the prompt in the model's template, or random ids around the images."""
    from owl_jax.chat import ChatError, ChatSession, read_image
    from owl_jax.config import ConfigError
    m = loaded.config.model
    rng = np.random.default_rng(args.seed)
    size = m.vision.image_size
    if text_only:
        pixels = None
    elif args.images:
        try:
            pixels = np.stack([read_image(p, size) for p in args.images])
        except ChatError as e:
            raise CheckError(str(e)) from None
    else:
        pixels = rng.normal(size=(1, size, size, 3)).astype(np.float32)
    n = 0 if pixels is None else len(pixels)
    qformer_prompt = None
    if args.prompt is not None:
        if loaded.tokenizer is None:
            raise CheckError(f"{args.checkpoint} has no tokenizer to encode --prompt with: pass --tokenizer")
        try:
            chat = ChatSession.for_config(loaded.config, loaded.tokenizer)
        except ConfigError:  # InstructBLIP without its Q-Former tokenizer: random instruction ids below
            chat = ChatSession.for_config(dataclasses.replace(loaded.config, model=dataclasses.replace(
                m, qformer=dataclasses.replace(m.qformer, text_input=False))), loaded.tokenizer)
        for p in (pixels if pixels is not None else []):
            chat.add_image(p)
        try:
            prompt = chat.prompt(args.prompt)
        except ChatError as e:
            raise CheckError(str(e)) from None
        what = f"--prompt in the {chat.template.name} template"
        tokens = prompt.tokens
        qformer_prompt = prompt.qformer_tokens
    else:
        high = min(vocab, image_token if image_token is not None and image_token > 3 else vocab)
        text = rng.integers(3, high, size=args.length).astype(np.int32)
        text[0] = m.text.bos_token_id if 0 <= m.text.bos_token_id < high else text[0]
        parts, cut = [text[:4]], 4
        for k in range(n):  # images spread through the text, with text between them
            nxt = 4 + (k + 1) * max(1, (args.length - 4) // (n + 1))
            parts += [np.full(m.tokens_per_image, -1, np.int32), text[cut:nxt]]
            cut = nxt
        parts.append(text[cut:])
        tokens = np.concatenate(parts).astype(np.int32)
        what = f"random token ids (seed {args.seed})"
    images = "" if not n else (f", {n} image{'s' * (n != 1)} x {m.tokens_per_image} slots "
                               f"({'--images' if args.images else f'random pixels, seed {args.seed}'})")
    qformer = None
    if n and args.prompt is not None and qformer_prompt is not None:  # InstructBLIP: the prompt's instruction
        qformer = np.stack(qformer_prompt)  # one message holds every image: the same ids for each
        images += f", the Q-Former reading --prompt ({qformer.shape[1]} WordPiece ids)"
    elif n and m.connector == "qformer" and m.qformer.text_input:  # InstructBLIP: the Q-Former's instruction
        qformer = np.tile(rng.integers(3, m.qformer.vocab_size, size=QFORMER_TEXT_LEN).astype(np.int32), (n, 1))
        images += f", {QFORMER_TEXT_LEN} random Q-Former instruction ids per image"
    return Inputs(tokens, pixels, f"{len(tokens)} positions: {what}{images}", qformer)


# ---------------------------------------------------------------------- weights, for the diagnosis


def differing_weights(ours_model, reference_dir: Path, limit: int = 6) -> list[str] | None:
    """`name (max abs d)` of the parameters whose values differ between `ours_model` and the reference
    directory loaded into owl-jax, largest first; None when the reference does not load with the same
    parameter names and shapes."""
    from owl_jax.convert.state import canonical_params
    from owl_jax.loading import LoadError, load_for_inference
    try:
        theirs = canonical_params(load_for_inference(reference_dir, require_tokenizer=False).model)
    except LoadError:
        return None
    base = lambda params: {k: v for k, v in params.items() if ".lora" not in k}  # noqa: E731 (merged into kernels)
    ours, theirs = base(canonical_params(ours_model)), base(theirs)
    if set(ours) != set(theirs) or any(np.shape(ours[k]) != np.shape(theirs[k]) for k in ours):
        return None
    diffs = []
    for k in sorted(ours):
        d = float(np.max(np.abs(np.asarray(ours[k], np.float64) - np.asarray(theirs[k], np.float64)), initial=0.0))
        if d > 0:
            diffs.append((d, k))
    diffs.sort(reverse=True)
    return [f"{k} (max abs {d:.3g})" for d, k in diffs[:limit]] + (
        [f"... {len(diffs) - limit} more"] if len(diffs) > limit else [])


# ---------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m owl_jax.check_logits", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="what owl-jax loads: a run (or RUN/checkpoints/STEP), an "
                                                       "export, a llava-hf / LLaMA / original LLaVA directory")
    p.add_argument("--reference", help="the Hugging Face directory whose transformers class gives the expected "
                                       "logits (default: --checkpoint, when it is one)")
    p.add_argument("--images", nargs="+", default=[], metavar="IMAGE", help="image files (default: one random image)")
    p.add_argument("--prompt", help="a question, asked in the model's conversation template (default: random ids)")
    p.add_argument("--atol", type=float, default=1e-4, help="largest allowed absolute logit difference (1e-4)")
    p.add_argument("--tokenizer", help="tokenizer for --prompt (default: the checkpoint's)")
    p.add_argument("--length", type=int, default=32, help="random text tokens without --prompt (32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random ids and pixels (0)")
    return p


def run(args) -> int:
    from owl_jax.loading import LoadError, checkpoint_kind, load_for_inference
    if not args.atol > 0:
        raise CheckError(f"--atol must be positive, got {args.atol}")
    if args.length < 8:
        raise CheckError(f"--length must be at least 8, got {args.length}")
    missing = [p for p in args.images if not os.path.isfile(p)]
    if missing:
        raise CheckError(f"image {missing[0]} not found")
    try:
        kind = checkpoint_kind(args.checkpoint)
        ref = Path(args.reference or args.checkpoint)
        ref_kind = checkpoint_kind(ref)
    except LoadError as e:
        raise CheckError(str(e)) from None
    if ref_kind not in REFERENCE_CLASSES:
        where = "--reference" if args.reference else "--checkpoint"
        raise CheckError(f"{where} {ref}: {_NO_CLASS[ref_kind]}")
    text_only = ref_kind == "hf-llama"
    if text_only and args.images:
        raise CheckError(f"the reference {ref} is a text-only LlamaForCausalLM: --images do not apply")
    c = _hf_config(ref)
    try:
        loaded = load_for_inference(args.checkpoint, tokenizer=args.tokenizer, merge_lora=True,
                                    require_tokenizer=bool(args.tokenizer))
    except LoadError as e:
        raise CheckError(str(e)) from None
    m = loaded.config.model
    if not text_only:
        if not loaded.has_vision:
            raise CheckError(f"{args.checkpoint} is a text-only model; compare it with a LlamaForCausalLM reference")
        seq = c.get("image_seq_length", c.get("num_query_tokens"))
        if seq is not None and int(seq) != m.tokens_per_image:
            raise CheckError(f"the reference makes {seq} visual tokens per image, {args.checkpoint} "
                             f"{m.tokens_per_image}: not the same architecture")
    text = c.get("text_config", c)
    vocab = min(int(text.get("vocab_size", m.text.vocab_size)), m.text.vocab_size)
    image_token = None if text_only else int(c.get("image_token_index", c.get("image_token_id", vocab)))
    model = _float32(loaded)
    inputs = make_inputs(args, loaded, text_only=text_only, image_token=image_token, vocab=vocab)
    ours = owl_logits(model, inputs, m.tokens_per_image)
    theirs = reference_logits(ref, ref_kind, inputs)
    if ours.shape != theirs.shape:
        raise CheckError(f"logits of shape {ours.shape} (owl-jax) and {theirs.shape} (transformers): the vocabularies "
                         f"differ ({ours.shape[-1]} vs {theirs.shape[-1]})")
    r = compare(ours, theirs)
    side = "its language model" if text_only and loaded.has_vision else "owl-jax"
    print(f"checkpoint: {args.checkpoint} ({kind}; {side}, float32)")
    print(f"reference:  {ref} (transformers {REFERENCE_CLASSES[ref_kind]}, float32)")
    print(f"inputs:     {inputs.description}")
    print(f"max abs logit difference {r.max_abs:.3g} (position {r.position}, token id {r.token}); "
          f"KL(reference || owl-jax) {r.kl:.3g} per position; top-1 agreement {100 * r.top1:.1f}%")
    if r.passed(args.atol):
        print(f"PASS: within --atol {args.atol:g}")
        return 0
    print(f"FAIL: max abs logit difference {r.max_abs:.3g} > --atol {args.atol:g}")
    stored = str(c.get("torch_dtype") or c.get("dtype") or text.get("torch_dtype") or "")
    if stored in ("bfloat16", "float16"):
        print(f"  note: the reference's weights are stored in {stored}; compare with a --dtype float32 export or "
              f"raise --atol")
    weights = differing_weights(model, ref)
    if weights:
        print("  weights that differ from the reference's: " + ", ".join(weights))
    elif weights == []:
        print("  the weights are identical: the computation differs")
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return run(args)
    except CheckError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
