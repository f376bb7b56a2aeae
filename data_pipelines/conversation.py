"""One conversation type for every instruction source, and the official mPLUG-Owl text format.

Every reader maps a source record to a `Conversation` (system prompt, turns, image references) and
validates it, so the tokeniser sees one shape and a malformed record fails loudly here (`BadRecord`,
which the pipeline counts and skips) instead of becoming a silently wrong sample.

The official text format (DESIGN.md §2; the released instruction jsonl):

    {system}
    Human: <image>
    Human: {question}
    AI: {answer}
    ...

i.e. `system + "".join("\\n" + Role + ": " + text)`. Each image is a human line of its own, before the
question it belongs to, so a human "block" may span several consecutive human turns; AI turns are
single. `render` produces exactly this text and `from_official` parses it back (round trip exact).

Validation (`validate`): roles are `human`/`ai`; turn texts are strings, non-empty, and contain no role
marker (`\\nHuman: `, `\\nAI: `, which would make the text ambiguous); the first turn is human, no two AI
turns are adjacent, and the last turn is AI (a trailing question has no answer to learn); `<image>`
occurs only in human turns and exactly once per entry of `images`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Sequence

SYSTEM_PROMPT = ("The following is a conversation between a curious human and AI assistant. The assistant "
                 "gives helpful, detailed, and polite answers to the user's questions.")
IMAGE_TAG = "<image>"
HUMAN, AI = "human", "ai"
_LABEL = {HUMAN: "Human", AI: "AI"}
#: The official format's role markers: no turn text may contain them (`validate`).
MPLUG_MARKERS = ("\nHuman: ", "\nAI: ")
_MARKERS = MPLUG_MARKERS


class BadRecord(ValueError):
    """A source record that cannot become a correct sample; `reason` says why (for skip counters)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class Turn:
    role: str  # HUMAN or AI
    text: str


@dataclasses.dataclass(frozen=True)
class Conversation:
    turns: tuple[Turn, ...]
    images: tuple[str, ...] = ()
    system: str = SYSTEM_PROMPT

    @property
    def num_images(self) -> int:
        return len(self.images)


def make_conversation(turns: Sequence[tuple[str, str] | Turn], images: Sequence[str] = (),
                      system: str = SYSTEM_PROMPT, *, markers: Sequence[str] = MPLUG_MARKERS) -> Conversation:
    """A validated Conversation from (role, text) pairs (`markers`: see `validate`)."""
    conv = Conversation(tuple(t if isinstance(t, Turn) else Turn(*t) for t in turns), tuple(images), system)
    validate(conv, markers)
    return conv


def check_system_prompt(system: str, markers: Sequence[str] = MPLUG_MARKERS) -> None:
    """Raise BadRecord unless `system` can open a rendered conversation: no `<image>`, none of the template's
    `markers` (the official format's by default; there a system prompt may not start with 'Human: ' either)."""
    if not isinstance(system, str):
        raise BadRecord("system prompt is not a string")
    if IMAGE_TAG in system:
        raise BadRecord("<image> in the system prompt")
    official = tuple(markers) == MPLUG_MARKERS
    if any(m in system for m in markers) or (official and system.startswith("Human: ")):
        raise BadRecord("system prompt contains a role marker")


def with_system_prompt(conv: Conversation, system: str | None) -> Conversation:
    """`conv` with the configured system prompt in place of the default one (None: keep). A record that
    brought its own system message (ShareGPT "system" turn) keeps it: it is part of the data."""
    if system is None or conv.system != SYSTEM_PROMPT:
        return conv
    return dataclasses.replace(conv, system=system)


def validate(conv: Conversation, markers: Sequence[str] = MPLUG_MARKERS) -> None:
    """Raise BadRecord unless `conv` can be rendered and trained on (see the module docstring). `markers` are
    the strings of the template's structure that no text may contain (`templates.Template.markers`; by
    default the official format's role markers)."""
    check_system_prompt(conv.system, markers)
    if not all(isinstance(i, str) and i for i in conv.images):
        raise BadRecord("image references must be non-empty strings")
    if not conv.turns:
        raise BadRecord("no turns")
    prev = None
    for k, turn in enumerate(conv.turns):
        if turn.role not in _LABEL:
            raise BadRecord(f"turn {k}: unknown role {turn.role!r}")
        if not isinstance(turn.text, str):
            raise BadRecord(f"turn {k}: text is {type(turn.text).__name__}, not str")
        if not turn.text.strip():
            raise BadRecord(f"turn {k}: empty {turn.role} turn")
        if tuple(markers) == MPLUG_MARKERS and any(m in turn.text for m in markers):
            raise BadRecord(f"turn {k}: text contains a role marker ('\\nHuman: ' or '\\nAI: ')")
        found = next((m for m in markers if m in turn.text), None)
        if found is not None:
            raise BadRecord(f"turn {k}: text contains a role marker ({found!r}) of the conversation template")
        if turn.role == AI:
            if IMAGE_TAG in turn.text:
                raise BadRecord(f"turn {k}: <image> in an AI turn")
            if prev is None:
                raise BadRecord("conversation starts with an AI turn (turns must alternate)")
            if prev == AI:
                raise BadRecord(f"turns {k - 1} and {k} are both AI (turns must alternate)")
        prev = turn.role
    if prev != AI:
        raise BadRecord("conversation ends with a human turn (no answer to learn)")
    tags = sum(t.text.count(IMAGE_TAG) for t in conv.turns)
    if tags != len(conv.images):
        raise BadRecord(f"{tags} <image> tags but {len(conv.images)} images")


def render(conv: Conversation) -> str:
    """The official mPLUG-Owl text of `conv` (the `text` field of the released jsonl)."""
    lines = "".join(f"\n{_LABEL[t.role]}: {t.text}" for t in conv.turns)
    return conv.system + lines if conv.system else lines[1:]


_SPLIT = re.compile(r"(\nHuman: |\nAI: )")


def parse_official_text(text: Any, images: Sequence[str] = ()) -> Conversation:
    """Inverse of `render`: the turns of an official-format text (system prompt = text before the first
    role marker; a text starting with 'Human: ' has an empty system prompt)."""
    if not isinstance(text, str):
        raise BadRecord(f"text is {type(text).__name__}, not str")
    if text.startswith("Human: "):
        text = "\n" + text
    parts = _SPLIT.split(text)
    system, rest = parts[0], parts[1:]
    if not rest:
        raise BadRecord("no 'Human: ' / 'AI: ' turns in text")
    turns = [Turn(HUMAN if marker == "\nHuman: " else AI, body) for marker, body in zip(rest[::2], rest[1::2])]
    conv = Conversation(tuple(turns), tuple(images), system)
    validate(conv)
    return conv


def _images(value: Any, key: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise BadRecord(f"'{key}' must be a string or a list of strings")


def _require(record: Any, *keys: str) -> None:
    if not isinstance(record, Mapping):
        raise BadRecord(f"record is {type(record).__name__}, not an object")
    missing = [k for k in keys if k not in record]
    if missing:
        raise BadRecord(f"missing field(s) {', '.join(missing)}")


def from_official(record: Mapping) -> Conversation:
    """mPLUG-Owl jsonl: {"image": [...], "text": "<whole conversation>", "task_type": ...}."""
    _require(record, "text")
    return parse_official_text(record["text"], _images(record.get("image"), "image"))


def from_alpaca(record: Mapping, system: str = SYSTEM_PROMPT, *, markers: Sequence[str] = MPLUG_MARKERS
                ) -> Conversation:
    """Alpaca: {"instruction", "input" (optional, may be ""), "output"}; the human turn is
    instruction + "\\n" + input, as in mPLUG-Owl's released instruction data."""
    _require(record, "instruction", "output")
    instruction, extra, output = record["instruction"], record.get("input") or "", record["output"]
    if not all(isinstance(v, str) for v in (instruction, extra, output)):
        raise BadRecord("instruction/input/output must be strings")
    question = f"{instruction}\n{extra}" if extra.strip() else instruction
    return make_conversation([(HUMAN, question), (AI, output)], system=system, markers=markers)


_SHAREGPT_ROLES = {"human": HUMAN, "user": HUMAN, "gpt": AI, "assistant": AI, "chatgpt": AI, "bard": AI,
                   "bing": AI, "model": AI}


def _messages(record: Mapping, roles: Mapping[str, str]) -> tuple[list[tuple[str, str]], str | None]:
    """(role, text) pairs of a `conversations` list, strictly alternating, plus a leading system message."""
    _require(record, "conversations")
    msgs = record["conversations"]
    if not isinstance(msgs, list) or not msgs:
        raise BadRecord("'conversations' must be a non-empty list")
    system = None
    out: list[tuple[str, str]] = []
    for k, m in enumerate(msgs):
        if not isinstance(m, Mapping) or "from" not in m or "value" not in m:
            raise BadRecord(f"message {k} lacks 'from'/'value'")
        src, text = m["from"], m["value"]
        if not isinstance(src, str) or not isinstance(text, str):
            raise BadRecord(f"message {k}: 'from' and 'value' must be strings")
        if src.lower() == "system" and k == 0:
            system = text
            continue
        role = roles.get(src.lower())
        if role is None:
            raise BadRecord(f"message {k}: unknown speaker {src!r}")
        if out and out[-1][0] == role:
            raise BadRecord(f"messages {k - 1} and {k} are both {role} (turns must alternate)")
        out.append((role, text))
    return out, system


def from_sharegpt(record: Mapping, system: str = SYSTEM_PROMPT, *, markers: Sequence[str] = MPLUG_MARKERS
                  ) -> Conversation:
    """ShareGPT / Vicuna: {"conversations": [{"from": "human"|"user", "value"}, {"from": "gpt"|"assistant"|
    "chatgpt"|"bard"|..., "value"}, ...]}; an optional leading {"from": "system"} replaces the system
    prompt. Speakers must alternate, starting with the human and ending with the assistant."""
    msgs, own_system = _messages(record, _SHAREGPT_ROLES)
    return make_conversation(msgs, system=own_system if own_system is not None else system, markers=markers)


def from_llava(record: Mapping, system: str = SYSTEM_PROMPT, *, markers: Sequence[str] = MPLUG_MARKERS
               ) -> Conversation:
    """LLaVA-Instruct, LLaVA-Pretrain (`blip_laion_cc_sbu_558k.json`, `chat.json`) and `llava_v1_5_mix665k.json`
    (entries without "image" are text-only): {"id": ..., "image": "x.jpg" (or a list, or absent),
    "conversations": [{"from": "human", "value": "<image>\\nWhat ...?"}, {"from": "gpt", ...}, ...]}. As in
    mPLUG-Owl's converted LLaVA data, each `<image>` of a human message becomes its own 'Human: <image>' line
    before the question (wherever the tag stood in the message; the LLaVA templates put it back in front of the
    question, as LLaVA's `preprocess_multimodal` does). A leading "gpt" message is dropped, as LLaVA's
    `preprocess_*` functions drop it."""
    msgs, _ = _messages(record, {"human": HUMAN, "gpt": AI})
    if msgs and msgs[0][0] == AI:
        msgs = msgs[1:]
    images = _images(record.get("image"), "image")
    turns: list[tuple[str, str]] = []
    for role, text in msgs:
        if role == HUMAN and IMAGE_TAG in text:
            turns += [(HUMAN, IMAGE_TAG)] * text.count(IMAGE_TAG)
            text = text.replace(IMAGE_TAG, "").strip()
            if not text:
                continue
        turns.append((role, text))
    return make_conversation(turns, images, system, markers=markers)


_BAIZE_SPLIT = re.compile(r"\[\|(Human|AI)\|\]")


def from_baize(record: Mapping, system: str = SYSTEM_PROMPT, *, markers: Sequence[str] = MPLUG_MARKERS
               ) -> Conversation:
    """Baize (project-baize `*_chat_data.json`, a list of {"topic", "input"}): `input` is
    "The conversation between human and AI assistant.\\n[|Human|] q\\n[|AI|] a\\n...[|Human|] " — a
    header line, then alternating markers, ending with an empty human turn that is dropped. The
    header is replaced by `system`."""
    _require(record, "input")
    text = record["input"]
    if not isinstance(text, str):
        raise BadRecord("'input' must be a string")
    parts = _BAIZE_SPLIT.split(text)
    if len(parts) < 3:
        raise BadRecord("no [|Human|] / [|AI|] turns in 'input'")
    turns = [(HUMAN if who == "Human" else AI, body.strip()) for who, body in zip(parts[1::2], parts[2::2])]
    if turns[-1] == (HUMAN, ""):
        turns.pop()
    for k in range(1, len(turns)):
        if turns[k][0] == turns[k - 1][0]:
            raise BadRecord(f"turns {k - 1} and {k} are both {turns[k][0]} (turns must alternate)")
    return make_conversation(turns, system=system, markers=markers)


#: MiniGPT-4's stage-2 instructions (Vision-CAIR/MiniGPT-4 `prompts/alignment.txt`, each after its
#: `<Img><ImageHere></Img> `): one is drawn per sample, as its `forward` draws `random.choice(prompt_list)`.
ALIGN_PROMPTS = ("Describe this image in detail.", "Take a look at this image and describe what you notice.",
                 "Please provide a detailed description of the picture.",
                 "Could you describe the contents of this image for me?")


def from_cc_sbu_align(record: Mapping, system: str = SYSTEM_PROMPT, *, markers: Sequence[str] = MPLUG_MARKERS,
                      variant: int = 0) -> Conversation:
    """MiniGPT-4's `cc_sbu_align` (`filter_cap.json` = {"annotations": [{"image_id", "caption"}, ...]}, images
    `image/<image_id>.jpg` beside it; `load_records` takes the list): the image, instruction
    `ALIGN_PROMPTS[variant % 4]` (the pipeline draws `variant` from its seed and the sample's index), and
    the caption as the answer — the sample of MiniGPT-4's `CCSBUAlignDataset` + `prompt_wrap`."""
    _require(record, "image_id", "caption")
    image_id, caption = record["image_id"], record["caption"]
    if not isinstance(image_id, (str, int)) or isinstance(image_id, bool) or not str(image_id):
        raise BadRecord("'image_id' must be a non-empty string or an integer")
    if not isinstance(caption, str):
        raise BadRecord("'caption' must be a string")
    turns = [(HUMAN, IMAGE_TAG), (HUMAN, ALIGN_PROMPTS[variant % len(ALIGN_PROMPTS)]), (AI, caption)]
    return make_conversation(turns, [f"image/{image_id}.jpg"], system, markers=markers)


READERS = {"official": from_official, "mplug_owl": from_official, "alpaca": from_alpaca,
           "sharegpt": from_sharegpt, "vicuna": from_sharegpt, "llava": from_llava, "baize": from_baize,
           "cc_sbu_align": from_cc_sbu_align}


def read_record(record: Any, source: str, *, markers: Sequence[str] = MPLUG_MARKERS,
                variant: int = 0) -> Conversation:
    """The Conversation of one record of `source` (a key of READERS); no text may contain one of `markers`
    (the conversation template's, `templates.Template.markers`; the official format is parsed at its own).
    `variant`: which of a format's generated instructions (cc_sbu_align: `ALIGN_PROMPTS`)."""
    try:
        reader = READERS[source]
    except KeyError:
        raise ValueError(f"unknown instruction source {source!r}; known: {sorted(READERS)}") from None
    if reader is from_official:
        return reader(record)
    if reader is from_cc_sbu_align:
        return reader(record, markers=markers, variant=variant)
    return reader(record, markers=markers)
