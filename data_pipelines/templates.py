"""Conversation templates: how a `Conversation` becomes the text, token ids and loss mask a family trains on.

One abstraction serves training samples (`tokenize.to_training_sample`), generation prompts
(`tokenize.to_prompt`, `owl_jax.chat.ChatSession`, so evaluation and serving too) and stop strings, so a
family's template applies everywhere at once (`data.template` in the config). A template turns a validated
conversation into `Piece`s: text (trained or not), image slots, BOS and EOS. The tokeniser
(`tokenize.encode_pieces`) encodes the text pieces — each run of `join`ed pieces in ONE tokenizer call, as
the family's own code tokenises the text between two images or special tokens — and takes the loss mask
from the pieces' `trained` flags, never from counting tokens of re-tokenised parts (LLaVA's "tokenization
mismatch", which silently zeroes a sample's loss, cannot happen; a text whose tokens would not split at the
answer boundary is refused as `tokenization_mismatch`, and a sample with nothing trained as
`no_trained_tokens`). A prompt is the pieces of the conversation with a placeholder answer, up to that
answer: exactly the context the model was trained to answer in.

Templates (`TEMPLATES`; the config's `data.template` choices are this list):

- `mplug_owl` (default): the official mPLUG-Owl format, `{system}\\nHuman: <image>\\nHuman: q\\nAI: a` with
  the official chunked tokenisation (every chunk on its own, EOS after each answer); bit-identical to what
  this project always trained (the golden pipeline tests pin it).
- `plain` (LLaVA stage 1, `conv_llava_plain` / `preprocess_plain`): the image, then the caption and `\\n`;
  the human text is dropped; loss on the caption and its `\\n` (no EOS). One image and one answer per sample.
- `vicuna_v1` (LLaVA-1.5 stage 2, `conv_vicuna_v1` / `preprocess_v1`):
  `{system} USER: <image>\\n{q} ASSISTANT: {a}</s>USER: {q2} ASSISTANT: {a2}</s>`; loss on every answer and
  its `</s>`; prompts end with `ASSISTANT:` as LLaVA's `get_prompt` makes them. (An empty system prompt
  drops the space after it too, where LLaVA would start the text with a space.)
- `llava_llama_2` (`conv_llava_llama_2` / `preprocess_llama_2`):
  `[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{q} [/INST] {a} </s><s>[INST] {q2} [/INST] {a2} </s>`.

- `minigpt4` (MiniGPT-4 stage 2, Vision-CAIR/MiniGPT-4 `mini_gpt4.py` `prompt_wrap` / `forward` with
  `prompt_template: '###Human: {} ###Assistant: '`, `end_sym: '###'`):
  `<s>###Human: <Img><image></Img> {q} ###Assistant: {a}###`, the text before and after each image one
  tokenizer call each (MiniGPT-4 splits at `<ImageHere>`), the answer + `###` a call of its own, loss on the
  answer and its `###` (no EOS: MiniGPT-4 pads with EOS and masks it). A later turn opens with `Human: `
  (the answer's `###` is the separator, as MiniGPT-4's `Conversation.get_prompt` puts it). The released demo
  prompts with a system prompt and `...{q}###Assistant:` (no space, no trailing space) — another context than
  the one stage 2 trains; we prompt with the trained one.
- `instructblip` (LAVIS `blip2_vicuna_instruct.py` `forward` / transformers' `InstructBlipProcessor`): the
  image's query tokens first, *then* BOS, the raw instruction (one call), the answer (a call of its own,
  as LAVIS tokenises `text_output` separately and drops its BOS) and EOS; loss on the answer and EOS. No
  system prompt; one image, in the first message. Later turns (LAVIS has none) append instruction and
  answer the same way. The Q-Former reads each image's instruction (`Template.image_instructions`).

The LLaVA templates reproduce LLaVA's `tokenizer_image_token` on a LLaMA tokenizer that encodes the text
around `<s>` / `</s>` / `<image>` with SentencePiece's dummy prefix (the slow `LlamaTokenizer`, `legacy=True`),
and group a message's images as LLaVA's `preprocess_multimodal` does (`<image>\\n` first, the text stripped).
`tests/test_templates.py` checks ids and masks against LLaVA's own algorithm.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from data_pipelines.conversation import (AI, HUMAN, IMAGE_TAG, MPLUG_MARKERS, SYSTEM_PROMPT, BadRecord,
                                        Conversation, Turn, check_system_prompt, validate)

TEXT, IMAGE, BOS, EOS = "text", "image", "bos", "eos"

#: LLaVA's system prompts (llava/conversation.py).
VICUNA_V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                    "The assistant gives helpful, detailed, and polite answers to the user's questions.")
LLAVA_LLAMA_2_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual "
                        "content that the user provides, and assist the user with a variety of tasks using natural "
                        "language.")
#: Text a LLaMA tokenizer turns into BOS / EOS ids in LLaVA's pipeline: never part of a turn.
_SPECIAL_TEXT = ("<s>", "</s>")


@dataclasses.dataclass(frozen=True)
class Piece:
    """A part of a rendered conversation. `kind` TEXT / IMAGE (one image's slots) / BOS / EOS; `trained`:
    the loss covers its tokens; `join` (TEXT): encoded in one tokenizer call with the TEXT piece before it."""

    kind: str
    text: str = ""
    trained: bool = False
    join: bool = False


class Template:
    """What every template defines (see the module docstring). Subclasses implement `_pieces`."""

    name: str = ""
    #: The system prompt when neither the data nor `data.system_prompt` gives one.
    default_system: str = ""
    #: Generation stops at these strings: the model starting a turn of its own.
    stop_strings: tuple[str, ...] = ()
    #: Strings no turn text or system prompt may contain (they would read as template structure).
    markers: tuple[str, ...] = ()
    #: A truncated answer ends with EOS (the template closes answers with EOS).
    eos_closes_answers: bool = True
    #: The ids start with BOS (False: the template places its BOS piece itself, InstructBLIP after the image).
    bos_first: bool = True

    def __repr__(self) -> str:
        return f"<template {self.name}>"

    # ------------------------------------------------------------------ conversations
    def check_system(self, system: str) -> None:
        """BadRecord unless `system` can open a conversation of this template."""
        check_system_prompt(system, self.markers)

    def with_system(self, conv: Conversation, configured: str | None) -> Conversation:
        """`conv` with the system prompt it is trained / prompted with: a record's own system message stays;
        a record with the readers' default (`SYSTEM_PROMPT`) gets `configured` (`data.system_prompt`), else
        this template's default."""
        if conv.system != SYSTEM_PROMPT:
            return conv
        system = self.default_system if configured is None else configured
        return conv if system == conv.system else dataclasses.replace(conv, system=system)

    def validate(self, conv: Conversation) -> None:
        """BadRecord unless `conv` can be trained on in this template."""
        validate(conv, self.markers)
        self.check_system(conv.system)

    def pieces(self, conv: Conversation) -> list[Piece]:
        """The pieces of a validated conversation (see `validate`)."""
        self.validate(conv)
        return self._pieces(conv)

    def prompt_pieces(self, turns: Sequence[Turn | tuple[str, str]], images: Sequence[str],
                      system: str) -> list[Piece]:
        """The pieces of a conversation ending with a human turn, followed by what opens the answer: the
        pieces of the conversation with a placeholder answer, up to that answer."""
        conv = Conversation(tuple(t if isinstance(t, Turn) else Turn(*t) for t in [*turns, (AI, "-")]),
                            tuple(images), system)
        self._validate_prompt(conv)
        pieces = self._pieces(conv)
        last = len(pieces)
        while last and pieces[last - 1].trained:  # the placeholder answer (and its EOS)
            last -= 1
        return pieces[:last]

    def _validate_prompt(self, conv: Conversation) -> None:
        self.validate(conv)

    def render(self, conv: Conversation) -> str:
        """The conversation as text (`<image>` for image slots, `<s>` / `</s>` for BOS / EOS after the first
        position): for the LLaVA templates exactly LLaVA's `Conversation.get_prompt()`."""
        text = {IMAGE: IMAGE_TAG, BOS: "<s>", EOS: "</s>"}
        return "".join(p.text if p.kind == TEXT else text[p.kind] for p in self.pieces(conv))

    def clean_answer(self, text: str) -> str:
        """A generated answer up to the first stop string or marker, stripped (what the chat history keeps:
        it always renders back to a valid conversation)."""
        cuts = [text.index(s) for s in (*self.stop_strings, *self.markers) if s and s in text]
        return (text[:min(cuts)] if cuts else text).strip()

    def image_instructions(self, conv: Conversation) -> list[str]:
        """Per image of `conv`, in order, the instruction of the human message that holds it (its text
        without image tags, stripped): what InstructBLIP's Q-Former reads beside that image."""
        out: list[str] = []
        for _, n, text in _human_messages(conv):
            out += [text] * n
        return out

    def _pieces(self, conv: Conversation) -> list[Piece]:
        raise NotImplementedError


def _grouped_turns(conv: Conversation) -> list[tuple[str, list[str]]]:
    """(role, texts) per message: consecutive human turns (an image is a human turn of its own in a
    `Conversation`) form one message; each AI turn is a message of its own."""
    out: list[tuple[str, list[str]]] = []
    for turn in conv.turns:
        if turn.role == HUMAN and out and out[-1][0] == HUMAN:
            out[-1][1].append(turn.text)
        else:
            out.append((turn.role, [turn.text]))
    return out


def _human_messages(conv: Conversation) -> list[tuple[str, int, str]]:
    """(role, images, text) per message: consecutive human turns form one message, its `<image>` tags
    counted and removed, its texts joined with '\n' and stripped; AI turns as they are (0 images)."""
    out: list[tuple[str, int, str]] = []
    for role, texts in _grouped_turns(conv):
        if role != HUMAN:
            out.append((AI, 0, texts[0]))
            continue
        n = sum(t.count(IMAGE_TAG) for t in texts)
        text = "\n".join(t.replace(IMAGE_TAG, "").strip() for t in texts)
        out.append((HUMAN, n, "\n".join(line for line in text.split("\n") if line.strip()).strip()))
    return out


def _messages(conv: Conversation) -> list[tuple[str, str]]:
    """LLaVA's messages of a conversation (`_grouped_turns`), a human message's images first as
    `preprocess_multimodal` puts them (`<image>\\n` + the text without the tags, stripped); AI turns stay as
    they are."""
    out: list[tuple[str, str]] = []
    for role, texts in _grouped_turns(conv):
        if role != HUMAN:
            out.append((AI, texts[0]))
            continue
        text = "\n".join(t for t in texts if t != IMAGE_TAG)
        n = sum(t.count(IMAGE_TAG) for t in texts)
        if n:
            text = (f"{IMAGE_TAG}\n" * n + text.replace(IMAGE_TAG, "").strip()).strip()
        out.append((HUMAN, text))
    return out


def _text_with_images(text: str, trained: bool = False, *, join_first: bool = True) -> list[Piece]:
    """Pieces of a text that may hold `<image>` tags (the text between two images is one tokenizer call)."""
    out: list[Piece] = []
    for j, part in enumerate(text.split(IMAGE_TAG)):
        if j:
            out.append(Piece(IMAGE))
        if part:
            out.append(Piece(TEXT, part, trained, join=join_first or j > 0))
    return out


class MplugOwl(Template):
    """The official mPLUG-Owl template (module docstring)."""

    name = "mplug_owl"
    default_system = SYSTEM_PROMPT
    stop_strings = ("\nHuman:", "\nAI:")
    markers = MPLUG_MARKERS

    def _pieces(self, conv: Conversation) -> list[Piece]:
        out: list[Piece] = []
        for kind, text in conversation_chunks(conv):
            if kind == "image":
                out.append(Piece(IMAGE))
            elif kind == "answer":
                out += [Piece(TEXT, text, trained=True), Piece(EOS, trained=True)]
            else:
                out.append(Piece(TEXT, text))
        return out


def conversation_chunks(conv: Conversation) -> list[tuple[str, str]]:
    """(kind, text) chunks of the official `render(conv)` as the official split makes them (kind 'text',
    'image' or 'answer'), but split only at real turn boundaries and at `<image>` inside human turns."""
    pieces: list[tuple[str, str]] = [("text", conv.system)]
    for k, turn in enumerate(conv.turns):
        if turn.role == AI:
            pieces += [("text", "\n"), ("sep", "AI: "), ("answer", turn.text)]
            continue
        pieces.append(("text", "Human: ") if (k == 0 and not conv.system) else ("sep", "\nHuman: "))
        for j, part in enumerate(turn.text.split(IMAGE_TAG)):
            if j:
                pieces.append(("image", IMAGE_TAG))
            pieces.append(("text", part))
    chunks: list[tuple[str, str]] = []
    for kind, text in pieces:  # adjacent text pieces are one chunk (the regex would not split them)
        if kind == "text" and chunks and chunks[-1][0] == "text":
            chunks[-1] = ("text", chunks[-1][1] + text)
        else:
            chunks.append((kind, text))
    return [(("text" if kind == "sep" else kind), text) for kind, text in chunks if text]


class Plain(Template):
    """LLaVA's stage-1 `plain` template: `<image>{caption}\\n`, loss on the caption and `\\n`."""

    name = "plain"
    stop_strings = ("\n",)
    markers = _SPECIAL_TEXT
    eos_closes_answers = False

    def validate(self, conv: Conversation) -> None:
        super().validate(conv)
        messages = _messages(conv)
        if len(messages) != 2 or len(conv.images) != 1:
            raise BadRecord(f"the plain template takes one image and its caption (one human and one AI message), "
                            f"not {len(messages)} messages and {len(conv.images)} images")

    def _validate_prompt(self, conv: Conversation) -> None:
        Template.validate(self, conv)  # prompts may lack an image (text-only generation) or have a history

    def check_system(self, system: str) -> None:
        pass  # the plain template has no system prompt (any configured one is ignored)

    def with_system(self, conv: Conversation, configured: str | None) -> Conversation:
        return conv if conv.system == "" else dataclasses.replace(conv, system="")

    def _pieces(self, conv: Conversation) -> list[Piece]:
        out: list[Piece] = []
        for role, text in _messages(conv):
            if role == HUMAN:  # preprocess_plain: the human message becomes its images alone
                out += [Piece(IMAGE)] * text.count(IMAGE_TAG)
            else:
                out.append(Piece(TEXT, text + "\n", trained=True))
        return out


class VicunaV1(Template):
    """LLaVA-1.5's `vicuna_v1` template (module docstring)."""

    name = "vicuna_v1"
    default_system = VICUNA_V1_SYSTEM
    stop_strings = ("USER:",)
    markers = _SPECIAL_TEXT

    def _pieces(self, conv: Conversation) -> list[Piece]:
        out = [Piece(TEXT, conv.system + " ")] if conv.system else []
        for role, text in _messages(conv):
            if role == HUMAN:
                out.append(Piece(TEXT, "USER: ", join=True))
                out += _text_with_images(text)
                out.append(Piece(TEXT, " ASSISTANT:", join=True))
            else:  # ' ' + answer: SentencePiece gives the space to the answer's first token ('▁A')
                out += [Piece(TEXT, " " + text, trained=True, join=True), Piece(EOS, trained=True)]
        return out


class LlavaLlama2(Template):
    """LLaVA's `llava_llama_2` template (module docstring)."""

    name = "llava_llama_2"
    default_system = LLAVA_LLAMA_2_SYSTEM
    stop_strings = ("[INST]",)
    markers = _SPECIAL_TEXT + ("[INST]", "[/INST]")

    def _pieces(self, conv: Conversation) -> list[Piece]:
        out: list[Piece] = []
        for i, (role, text) in enumerate(_messages(conv)):
            if role == HUMAN:
                if i:
                    out.append(Piece(BOS))
                system = f"<<SYS>>\n{conv.system}\n<</SYS>>\n\n" if (i == 0 and conv.system) else ""
                out += _text_with_images(f"[INST] {system}{text} [/INST]")
            else:
                out += [Piece(TEXT, f" {text} ", trained=True, join=True), Piece(EOS, trained=True)]
        return out


#: MiniGPT-4's image placeholder around the visual tokens (`<Img><ImageHere></Img>`).
MINIGPT4_IMAGE = "<Img>" + IMAGE_TAG + "</Img>"


class MiniGPT4(Template):
    """MiniGPT-4's stage-2 template (module docstring)."""

    name = "minigpt4"
    stop_strings = ("###",)
    markers = _SPECIAL_TEXT + ("###", "<Img>", "</Img>", "<ImageHere>")
    eos_closes_answers = False

    def _pieces(self, conv: Conversation) -> list[Piece]:
        out: list[Piece] = []
        for i, (role, n, text) in enumerate(_human_messages(conv)):
            if role == AI:  # its own tokenizer call, as MiniGPT-4 tokenises `caption + end_sym`
                out.append(Piece(TEXT, text + "###", trained=True))
                continue
            opening = f"{conv.system}###Human: " if i == 0 else "Human: "
            body = " ".join([MINIGPT4_IMAGE] * n + ([text] if text else []))
            out += _text_with_images(f"{opening}{body} ###Assistant: ", join_first=False)
        return out


class InstructBlip(Template):
    """InstructBLIP's (LAVIS) prompt format (module docstring)."""

    name = "instructblip"
    markers = _SPECIAL_TEXT
    bos_first = False

    def validate(self, conv: Conversation) -> None:
        super().validate(conv)
        counts = [n for role, n, _ in _human_messages(conv) if role == HUMAN]
        if sum(counts) > 1 or sum(counts[1:]):
            raise BadRecord("the instructblip template takes one image, in the first message")

    def check_system(self, system: str) -> None:
        pass  # no system prompt (any configured one is ignored)

    def with_system(self, conv: Conversation, configured: str | None) -> Conversation:
        return conv if conv.system == "" else dataclasses.replace(conv, system="")

    def _pieces(self, conv: Conversation) -> list[Piece]:
        messages = _human_messages(conv)
        out = [Piece(IMAGE)] * messages[0][1] + [Piece(BOS)]
        for role, _, text in messages:
            if role == AI:  # LAVIS: `text_output + eos` tokenised on its own, its BOS dropped
                out += [Piece(TEXT, text, trained=True), Piece(EOS, trained=True)]
            elif text:
                out.append(Piece(TEXT, text))
        return out


TEMPLATES: dict[str, Template] = {t.name: t for t in (MplugOwl(), Plain(), VicunaV1(), LlavaLlama2(), MiniGPT4(),
                                                      InstructBlip())}
DEFAULT = TEMPLATES["mplug_owl"]


def get_template(name: str | Template | None) -> Template:
    """The template called `name` (None: mplug_owl); ValueError naming the choices for an unknown one."""
    if name is None:
        return DEFAULT
    if isinstance(name, Template):
        return name
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown conversation template {name!r}; choose one of {', '.join(TEMPLATES)}") from None
