"""Conversation text -> token ids, image slots and loss masks.

Two functions on purpose:

`tokenize_conversation` reproduces the official mPLUG-Owl `_extract_text_token_from_conversation`
(`xgpt3_dataset.py`) bit for bit, quirks included; the golden `pipeline_cases.npz` / `inputs.npz` pin it.
It exists to prove that our chunking and masking match the released recipe, and for exact comparisons.

`to_training_sample` is what we train on, in the configured conversation template (`data.template`,
`templates.py`: the pieces a template renders are tokenised by `encode_pieces`, the loss mask comes from the
pieces, and `to_prompt` gives generation the same context). In the default `mplug_owl` template: the
official chunking (split at `AI: `, `\\nHuman: `, `<image>`; each chunk tokenised on its own; BOS first; EOS
after every answer; `tokens_per_image` slots of id -1 per image), so untruncated samples equal the official
ids, but:

- it tokenises the validated `Conversation` structurally, splitting only at real turn boundaries, so an
  answer that merely contains "AI: " (e.g. "OpenAI: ...") is not cut in two with a stray EOS, as the
  official regex split does;
- `seq_len` counts model positions (= the official `max_length + 1` ids), and truncation never leaves
  a wrong sample. The official code (see the golden cases) stops at an image that does not fit but
  keeps that image in the sample's image list (case1: the two-image record cut at 40 keeps 0 slots and
  2 images), cuts human text mid-question and keeps it with no answer, and so produces samples with no
  loss token at all (case0, case1, case2: all three golden truncations have an all-zero prompt_mask),
  and a cut that leaves 0 answer tokens still trains a lone EOS. Ours: an image whose slots would be cut
  is dropped together with everything after it and the image list is shortened to the images kept; a
  cut answer keeps its first tokens and its last kept position becomes EOS (with loss), unless not one
  answer token would remain before that EOS, in which case the answer is dropped; the sample then ends
  at the EOS of its last (possibly cut) answer, so no trailing question or image without an answer is
  kept; and a sample left with no answer token raises `BadRecord("too long")`;
- a BOS with id 0 is kept (the official `bos_token_id > 0` test drops it);
- two images with no token between them (which the model would merge into one run, losing one image)
  raise `BadRecord`.

Every template gets the same truncation (templates whose answers do not end with EOS, `plain`, just cut
the answer), and a sample with no trained token raises `BadRecord("no trained tokens")`: it is skipped and
counted (`no_trained_tokens`), never trained on with a zero loss.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import numpy as np

from data_pipelines.conversation import IMAGE_TAG, SYSTEM_PROMPT, BadRecord, Conversation, Turn, parse_official_text
from data_pipelines.templates import (BOS, EOS, IMAGE, TEXT, Piece, Template, conversation_chunks,
                                      get_template)
from data_pipelines.tokenizers import Tokenizer

IMAGE_ID = -1  # the official media token id of `<image>`; every slot of an image carries it


# ----------------------------------------------------------------------------------------------------
# Official reproduction
# ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TokenizedSample:
    """The official pipeline's output for one text (arrays int64, like the torch tensors)."""
    input_ids: np.ndarray         # [max_length + 1], image slots = -1, padded with pad id
    non_padding_mask: np.ndarray  # [max_length], 1 where i < seq_length - 1
    non_media_mask: np.ndarray    # [max_length], 0 where input_ids[1:] is an image slot
    prompt_mask: np.ndarray       # [max_length], 1 where input_ids[1:] is an answer token or its EOS
    seq_length: int               # ids before padding
    prompt_length: int            # -1 text-only, -2 with images (unused by the official model)

    @property
    def labels(self) -> np.ndarray:
        """The official batch's `labels` (== input_ids; the model masks them in place)."""
        return self.input_ids


_OFFICIAL_TEXT_SPLIT = re.compile("(" + "|".join(map(re.escape, ["AI: ", "\nHuman: "])) + ")")
_OFFICIAL_MEDIA_SPLIT = re.compile("(" + "|".join(map(re.escape, [IMAGE_TAG, "AI: ", "\nHuman: "])) + ")")


def tokenize_conversation(text: str, tokenizer: Tokenizer, max_length: int,
                          tokens_per_image: int) -> TokenizedSample:
    """Official `_extract_text_token_from_conversation(text, max_length)`, with `media_lengths =
    {'<image>': tokens_per_image}` (65 for the released model).

    Where the official code fails its length assertion (a first chunk — the system prompt — longer
    than max_length + 1 ids; the official dataset then silently moves to the next record) this raises
    BadRecord.
    """
    bos = [tokenizer.bos_id] if (tokenizer.bos_id or 0) > 0 else []
    eos = tokenizer.eos_id
    limit = max_length + 1
    enc: list[int] = []
    labels: list[int] = []
    n = 0
    has_media = IMAGE_TAG in text
    if not has_media:
        prompt_length = -1
        chunks = _OFFICIAL_TEXT_SPLIT.split(text)
        for idx, chunk in enumerate(chunks):
            if idx == 0:
                enc = bos + tokenizer.encode(chunk)
                n = len(enc)
                labels = [0] * n
                continue
            cur = tokenizer.encode(chunk)
            stop = False
            if chunks[idx - 1] == "AI: ":
                if n + len(cur) >= max_length:
                    cur = cur[:max_length - n]
                    stop = True
                cur = cur + [eos]
                lab = 1
            else:
                if n + len(cur) >= limit:
                    cur = cur[:limit - n]
                    stop = True
                lab = 0
            n += len(cur)
            enc += cur
            labels += [lab] * len(cur)
            if stop:
                break
    else:
        prompt_length = -2
        chunks = [c for c in _OFFICIAL_MEDIA_SPLIT.split(text) if c]
        for idx, chunk in enumerate(chunks):
            if n >= limit:
                break
            if idx == 0:
                enc = bos + tokenizer.encode(chunk)
                n = len(enc)
                labels = [0] * n
            elif chunk == IMAGE_TAG:
                if n + tokens_per_image > limit:
                    break
                enc += [IMAGE_ID] * tokens_per_image
                labels += [0] * tokens_per_image
                n += tokens_per_image
            elif chunks[idx - 1] == "AI: ":
                cur = tokenizer.encode(chunk)
                if n + len(cur) >= max_length:
                    cur = cur[:max_length - n]
                cur = cur + [eos]
                n += len(cur)
                enc += cur
                labels += [1] * len(cur)
            else:
                cur = tokenizer.encode(chunk)
                if n + len(cur) >= limit:
                    cur = cur[:limit - n]
                n += len(cur)
                enc += cur
                labels += [0] * len(cur)
    if n > limit:
        raise BadRecord(f"first chunk is {n} ids, longer than max_length + 1 = {limit} (official assertion)")
    pad = limit - n
    ids = np.asarray(enc + [tokenizer.pad_id] * pad, np.int64)
    label_arr = np.asarray(labels + [0] * pad, np.int64)
    non_padding = (np.arange(max_length) < n - 1).astype(np.int64)
    non_media = (ids[1:] >= 0).astype(np.int64) if has_media else np.ones(max_length, np.int64)
    return TokenizedSample(ids, non_padding, non_media, label_arr[1:], n, prompt_length)


# ----------------------------------------------------------------------------------------------------
# Our training samples
# ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TrainingSample:
    """One unpadded sample in the train-step format (see owl_jax.models.owl.MplugOwl.loss_terms).

    tokens [L] int32 with `tokens_per_image` ids of -1 per image; targets [L] int32: tokens[t+1] (pad id
    at image slots and at the last position); loss_mask [L] bool: the target is an answer token or the
    EOS closing an answer (False at the last position, whose target lies outside the sample).
    """
    tokens: np.ndarray
    targets: np.ndarray
    loss_mask: np.ndarray
    images: tuple[str, ...]
    truncated: bool = False

    @property
    def num_images(self) -> int:
        return len(self.images)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


_conversation_chunks = conversation_chunks  # (the official chunking lives with the templates)


_TEMPLATE_PIECES = re.compile(r"(\nHuman: |(?<=\n)AI: )")


def encode_template_text(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of template text (the text around a caption) cut where `_conversation_chunks` cuts a
    conversation: '\\nHuman: ' and the 'AI: ' after a newline are encoded on their own. SentencePiece
    tokenises "\\nAI: " as one string differently from "\\n" + "AI: ", so without this a caption template
    written in the conversation format ("Human: <image>\\nAI: {caption}") would show the LLM role markers it
    never saw in instruction data."""
    return [i for piece in _TEMPLATE_PIECES.split(text) if piece for i in tokenizer.encode(piece)]


@dataclasses.dataclass(frozen=True)
class Encoded:
    """Token ids of a template's pieces (image slots = -1) and, per id, the answer it belongs to (-1: none;
    an answer is a run of trained pieces, its EOS included), with where each image and answer starts."""
    ids: list[int]
    answer: list[int]
    image_starts: list[int]
    answer_starts: list[int]


def _encode_unit(tokenizer: Tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """The ids of `texts` tokenised as ONE string, split at the pieces' boundaries. A boundary where the
    tokens of the text before it are not a prefix of the whole's (a token would straddle it) cannot be
    placed: BadRecord("tokenization mismatch ...") instead of a loss mask shifted by a token."""
    if len(texts) == 1:
        return [tokenizer.encode(texts[0])]
    whole = tokenizer.encode("".join(texts))
    spans, pos = [], 0
    for k in range(1, len(texts)):
        head = tokenizer.encode("".join(texts[:k]))
        if len(head) < pos or whole[:len(head)] != head:
            raise BadRecord(f"tokenization mismatch: the tokens of {''.join(texts[:k])[-40:]!r} are not a prefix "
                            f"of those of the text they open, so the answer boundary falls inside a token")
        spans.append(whole[pos:len(head)])
        pos = len(head)
    spans.append(whole[pos:])
    return spans


def encode_pieces(pieces: Sequence[Piece], tokenizer: Tokenizer, tokens_per_image: int, *,
                  bos_first: bool = True) -> Encoded:
    """Ids of a template's pieces: BOS first (when the tokenizer has one and `bos_first`: the template's
    `bos_first`), each run of joined text pieces in one tokenizer call, `tokens_per_image` ids of -1 per image;
    BOS / EOS pieces are the special ids."""
    bos = tokenizer.bos_id if tokenizer.bos_id is not None and tokenizer.bos_id >= 0 else None
    ids: list[int] = [] if bos is None or not bos_first else [bos]
    answer: list[int] = [-1] * len(ids)
    image_starts: list[int] = []
    answer_starts: list[int] = []
    units: list[list[Piece]] = []
    for p in pieces:
        if p.kind == TEXT and p.join and units and units[-1][-1].kind == TEXT:
            units[-1].append(p)
        else:
            units.append([p])
    in_answer = False

    def add(cur: list[int], trained: bool) -> None:
        nonlocal in_answer
        if trained and not in_answer:
            answer_starts.append(len(ids))
        in_answer = trained
        ids.extend(cur)
        answer.extend([len(answer_starts) - 1 if trained else -1] * len(cur))

    for unit in units:
        kind = unit[0].kind
        if kind == IMAGE:
            if ids and ids[-1] < 0:
                raise BadRecord("two <image> slots with no token between them")
            image_starts.append(len(ids))
            add([IMAGE_ID] * tokens_per_image, False)
        elif kind == BOS:
            add([] if bos is None else [bos], unit[0].trained)
        elif kind == EOS:
            add([tokenizer.eos_id], unit[0].trained)
        else:  # one tokenizer call; split only where the loss mask changes
            groups: list[tuple[bool, str]] = []
            for p in unit:
                if groups and groups[-1][0] == p.trained:
                    groups[-1] = (p.trained, groups[-1][1] + p.text)
                else:
                    groups.append((p.trained, p.text))
            for (trained, _), cur in zip(groups, _encode_unit(tokenizer, [text for _, text in groups])):
                add(cur, trained)
    return Encoded(ids, answer, image_starts, answer_starts)


def to_training_sample(conversation: Conversation | str, tokenizer: Tokenizer, seq_len: int,
                       tokens_per_image: int, *, images: Sequence[str] = (),
                       template: Template | str | None = None) -> TrainingSample:
    """Tokens, next-token targets and answer loss mask of one conversation, at most `seq_len` long, in
    `template` (a `templates.TEMPLATES` name or Template; None: the official mPLUG-Owl one).

    `conversation` is a Conversation (validated here, for the template) or official-format text (parsed with
    `images`). Truncation (see the module docstring for how it differs from the official code): never splits
    an image, drops an image that does not fit with everything after it, ends a cut answer with EOS (templates
    whose answers end with EOS), ends the sample at its last answer's end, and raises BadRecord("too long")
    when no answer token fits. A sample with no trained token at all raises BadRecord("no trained tokens").
    """
    template = get_template(template)
    conv = conversation if isinstance(conversation, Conversation) else parse_official_text(conversation, images)
    enc = encode_pieces(template.pieces(conv), tokenizer, tokens_per_image, bos_first=template.bos_first)
    ids, answer, image_starts, answer_starts = enc.ids, enc.answer, enc.image_starts, enc.answer_starts
    eos, pad = tokenizer.eos_id, tokenizer.pad_id
    truncated = len(ids) > seq_len
    end = min(len(ids), seq_len)
    if truncated:
        for s in image_starts:
            if s < end < s + tokens_per_image:  # the cut would split this image: drop it and the rest
                end = s
                break
        a = answer[end - 1] if end else -1
        if a >= 0 and answer[end] == a and template.eos_closes_answers:  # the cut falls inside answer a
            if end - 1 - answer_starts[a] >= 1:  # at least one answer token before the new EOS
                ids[end - 1] = eos
            else:
                end = answer_starts[a]
        while end and answer[end - 1] < 0:  # end at the last kept answer's end
            end -= 1
        if not end:
            raise BadRecord("too long")
    tokens = np.asarray(ids[:end], np.int32)
    targets = np.empty_like(tokens)
    targets[:-1] = np.where(tokens[1:] < 0, pad, tokens[1:])
    targets[-1] = pad
    is_answer = np.asarray(answer[:end]) >= 0
    loss_mask = np.zeros(end, bool)
    loss_mask[:-1] = is_answer[1:]
    if not loss_mask.any():
        raise BadRecord("no trained tokens: the sample's answers encode to no token")
    kept = sum(1 for s in image_starts if s < end)
    return TrainingSample(tokens, targets, loss_mask, conv.images[:kept], truncated)


def to_prompt(turns: Sequence[tuple[str, str] | Turn], tokenizer: Tokenizer, tokens_per_image: int, *,
              images: Sequence[str] = (), system: str = SYSTEM_PROMPT,
              template: Template | str | None = None) -> np.ndarray:
    """Token ids (int32, `tokens_per_image` ids of -1 per image) of a conversation that ends with a human
    turn, followed by what opens the answer in `template` (mPLUG-Owl: `AI: `; vicuna_v1: ` ASSISTANT:`):
    what generation continues from.

    The ids are exactly the first ids of `to_training_sample` of the same conversation with an answer
    appended (same chunking, BOS, image slots), i.e. the context the model was trained to answer in (for
    the LLaVA templates: LLaVA's own `get_prompt()` through `tokenizer_image_token`). The official
    `MplugOwlProcessor` splits prompts only at `<image>`, which gives other SentencePiece ids around
    `\nHuman: ` / `AI: ` than its own training pipeline; we follow the training pipeline.
    Raises BadRecord for a conversation that could not be trained on either (see `Template.validate`).
    """
    template = get_template(template)
    pieces = template.prompt_pieces(turns, images, system)
    return np.asarray(encode_pieces(pieces, tokenizer, tokens_per_image, bos_first=template.bos_first).ids,
                      np.int32)
