"""A multi-turn conversation in the model's conversation template, turned into generation prompts.

The template is the run's `data.template` (`data_pipelines/templates.py`; a Hugging Face directory gets its
family's, see `owl_jax.loading`), so chat, `owl_jax.generate`, evaluation and serving prompt a model exactly
as it was trained. In the default official mPLUG-Owl template:

    {system}
    Human: <image>
    Human: {question}
    AI: {answer}
    Human: {next question}
    AI: <- generation continues here

(LLaVA-1.5's `vicuna_v1`: `{system} USER: <image>\n{question} ASSISTANT: {answer}</s>USER: ... ASSISTANT:`.)
Images are human turns of their own, placed where they were added (before the next question), as in the
released instruction data. Prompts are tokenised by `data_pipelines.tokenize.to_prompt`, i.e. exactly as
training tokenised the same conversation. Answers are cut at the template's stop strings (a model that keeps
going would otherwise write the human's next turn), so the history always renders back to a valid
conversation.
When a prompt and its answer would not fit the context (`max_position_embeddings`), the oldest
question/answer turns are dropped (images stay), then the answer is given what room is left: the
prompt carries that room as its own budget (`Prompt.max_new_tokens`), so batching never shortens it.

`interactive` is the `owl_jax.generate --interactive` loop: an input prompt, slash commands (an unknown one
is reported, never asked), `/reset` back to the command line's images.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from data_pipelines.conversation import AI, HUMAN, IMAGE_TAG, BadRecord
from data_pipelines.templates import TEMPLATES, Template, get_template

if TYPE_CHECKING:
    from owl_jax.config import Config
    from owl_jax.generate import Generator, GenerationSettings, Prompt
    from owl_jax.loading import Loaded

#: Stop strings of the default (mPLUG-Owl) template: the model starting the next turn itself. Other templates
#: have their own (`Template.stop_strings`, `stop_strings(cfg)`, `ChatSession.stop_strings`).
DEFAULT_STOP = TEMPLATES["mplug_owl"].stop_strings


class ChatError(ValueError):
    """A question, image or history that cannot become a prompt; one line, shown to the user."""


def template_for(cfg: "Config") -> Template:
    """The conversation template a model was trained with (`data.template`)."""
    return get_template(cfg.data.template)


def system_prompt(cfg: "Config", override: str | None = None) -> str:
    """The system prompt to chat with: `override`, else the run's `data.system_prompt`, else (None) the
    template's own (mPLUG-Owl: the official one)."""
    if override is not None:
        return override
    return template_for(cfg).default_system if cfg.data.system_prompt is None else cfg.data.system_prompt


def stop_strings(cfg: "Config") -> tuple[str, ...]:
    """Where generation stops for a model of `cfg` by default: its template's stop strings."""
    return template_for(cfg).stop_strings


def load_image(path: str, loaded: "Loaded") -> np.ndarray:
    """[H, W, 3] CLIP-normalised pixels of an image file at the model's resolution (official inference
    preprocessing: bicubic resize to a square, no crop)."""
    if not loaded.has_vision:
        raise ChatError(f"{loaded.kind} checkpoints are text-only; images are not supported")
    return read_image(path, loaded.config.model.vision.image_size)


def read_image(path: str, size: int) -> np.ndarray:
    """`load_image` for a given resolution; ChatError (one line) for a missing or unreadable file."""
    from data_pipelines import images as image_ops
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ChatError(f"cannot read image {path}: {e.strerror or e}") from None
    try:
        image = image_ops.decode_image(data)
    except image_ops.BadSample as e:
        raise ChatError(f"{path} is not a readable image ({e})") from None
    return image_ops.preprocess(image, size, train=False)


def clean_answer(text: str, template: Template | str | None = None) -> str:
    """The answer up to the template's first stop string (None: mPLUG-Owl's new role marker), stripped."""
    return get_template(template).clean_answer(text)


class ChatSession:
    """The turns and images of one conversation in a conversation template (None: mPLUG-Owl's; see
    `for_config`). `prompt` builds the next prompt without changing the session; `record` appends a question
    and its answer (so batched callers can generate in between); `stop_strings` are the template's."""

    def __init__(self, tokenizer, *, tokens_per_image: int, system: str, max_context: int,
                 template: Template | str | None = None, qformer_tokenizer=None):
        self.tokenizer, self.tokens_per_image = tokenizer, tokens_per_image
        self.system, self.max_context = system, max_context
        self.template = get_template(template)
        # InstructBLIP: each image's instruction (the text of its human message) also goes to the Q-Former.
        self.qformer_tokenizer = qformer_tokenizer
        self.turns: list[tuple[str, str]] = []
        self.images: list[np.ndarray] = []

    @classmethod
    def for_config(cls, cfg: "Config", tokenizer, *, system: str | None = None) -> "ChatSession":
        """A session with the model's image slots and context (`max_position_embeddings`), its template
        (`data.template`), the system prompt of `system_prompt(cfg, system)` and, for a Q-Former that reads
        the instruction, `data.qformer_tokenizer`."""
        from owl_jax.data import qformer_tokenizer_for
        return cls(tokenizer, tokens_per_image=cfg.model.tokens_per_image, system=system_prompt(cfg, system),
                   max_context=cfg.model.text.max_position_embeddings, template=template_for(cfg),
                   qformer_tokenizer=qformer_tokenizer_for(cfg))

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """The template's stop strings (generation settings' default)."""
        return self.template.stop_strings

    @property
    def num_images(self) -> int:
        return len(self.images)

    def reset(self) -> None:
        self.turns, self.images = [], []

    def add_image(self, pixels: np.ndarray) -> None:
        self.turns.append((HUMAN, IMAGE_TAG))
        self.images.append(np.asarray(pixels, np.float32))

    def prompt(self, question: str, *, max_new_tokens: int = 0) -> "Prompt":
        """The prompt asking `question` after the history, dropping the oldest question/answer turns while
        the prompt plus `max_new_tokens` would exceed the context. The prompt's own `max_new_tokens` is the
        room left after it (`room`), so the generator stops this row there, whatever else is batched."""
        from data_pipelines.tokenize import to_prompt
        from owl_jax.generate import Prompt
        question = question.strip()
        if not question:
            raise ChatError("empty question")
        if IMAGE_TAG in question:
            raise ChatError(f"{IMAGE_TAG} in a question; add images with --image or /image PATH")
        turns = list(self.turns)
        while True:
            try:
                tokens = to_prompt([*turns, (HUMAN, question)], self.tokenizer, self.tokens_per_image,
                                   images=["image"] * len(self.images), system=self.system, template=self.template)
            except BadRecord as e:
                raise ChatError(f"cannot ask that: {e.reason}") from None
            droppable = [i for i, (_, text) in enumerate(turns) if text != IMAGE_TAG]
            if len(tokens) + max_new_tokens <= self.max_context or not droppable:
                break
            del turns[droppable[0]]
        if len(tokens) >= self.max_context:
            raise ChatError(f"the prompt is {len(tokens)} tokens, which leaves no room in the context of "
                            f"{self.max_context}")
        pixels = np.stack(self.images) if self.images else None
        return Prompt(tokens, pixels, max_new_tokens=self.max_context - len(tokens),
                      qformer_tokens=self._qformer_tokens([*turns, (HUMAN, question)]))

    def _qformer_tokens(self, turns) -> tuple[np.ndarray, ...] | None:
        """Each image's instruction ids for the Q-Former, exactly as the training pipeline derives them
        (`Template.image_instructions`: the text of the human message holding the image)."""
        if self.qformer_tokenizer is None or not self.images:
            return None
        from data_pipelines.conversation import Conversation, Turn
        conv = Conversation(tuple(Turn(*t) for t in turns), ("image",) * len(self.images), self.system)
        return tuple(np.asarray(self.qformer_tokenizer.encode(text), np.int32)
                     for text in self.template.image_instructions(conv))

    def record(self, question: str, answer: str) -> str:
        """Append the turn; returns the cleaned answer (an empty answer leaves only the question)."""
        answer = self.template.clean_answer(answer)
        self.turns.append((HUMAN, question.strip()))
        if answer:
            self.turns.append((AI, answer))
        return answer

    def room(self, prompt: "Prompt") -> int:
        """New tokens that fit in the context after `prompt`."""
        return self.max_context - len(prompt.tokens)

    def answer(self, generator: "Generator", question: str, settings: "GenerationSettings") -> str:
        """Generate the answer to `question` (at most `room` new tokens) and record the turn."""
        prompt = self.prompt(question, max_new_tokens=settings.max_new_tokens)
        return self.record(question, generator.generate([prompt], settings)[0].text)


def newline_warning(tokenizer) -> str | None:
    """A warning when `tokenizer` cannot encode a newline (it does not survive an encode/decode round trip,
    e.g. a SentencePiece model without a newline piece or byte fallback): every `\n` of the conversation
    template then becomes the unknown token (decoded `⁇`), so the model does not see the template's line
    structure and the stop strings at a new `Human:` / `AI:` line cannot match. None when it can."""
    try:
        text = tokenizer.decode(tokenizer.encode("a\nb"))
    except Exception as e:  # a broken tokenizer is reported where it is used, not here
        return f"the tokenizer cannot round-trip a newline ({type(e).__name__})"
    if "\n" in text:
        return None
    return ("the tokenizer has no piece for a newline: every line break of the conversation template becomes "
            f"{text.replace('a', '', 1).rsplit('b', 1)[0].strip() or 'nothing'!r} (the unknown token), and the "
            "stop strings at a new 'Human:' / 'AI:' line cannot match; use a tokenizer with byte fallback "
            "(LLaMA's has one)")


# ---------------------------------------------------------------------- the interactive loop

#: The chat's commands (a line starting with "/" is a command, never a question; "//..." asks "/...").
COMMANDS = (("/image PATH", "add an image"), ("/reset", "start over (the --image pictures stay)"),
            ("/quit", "end (also /exit or end of input)"), ("/help", "this list"))
#: Shown before each question (on stderr, so stdout carries only the answers).
INPUT_PROMPT = "Human: "


def command_list() -> str:
    return ", ".join(name for name, _ in COMMANDS)


def interactive(chat: ChatSession, generator: "Generator", settings: "GenerationSettings", loaded: "Loaded", *,
                images: tuple[np.ndarray, ...] = (), stdin=None, stdout=None, stderr=None) -> int:
    """Multi-turn chat on `stdin`: an input prompt before each line, answers as `AI: ...` lines on `stdout`,
    messages on `stderr`. `images` are the command line's pictures (already in `chat`): `/reset` starts a
    new conversation with them. A bad line (unknown command, unreadable image, a question that does not
    fit) is reported in one line and the session goes on. Returns the exit status (130 on Ctrl-C)."""
    import sys
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr

    def say(text: str) -> None:
        print(text, file=stderr, flush=True)

    say(f"chat: type a question; commands: {command_list()}")
    try:
        while True:
            stderr.write(INPUT_PROMPT)
            stderr.flush()
            line = stdin.readline()
            if not line:  # end of input
                stderr.write("\n")
                break
            line = line.strip()
            if not line:
                continue
            if line.startswith("//"):  # an escaped question that starts with "/"
                line = line[1:]
            elif line.startswith("/"):
                command, _, arg = line.partition(" ")
                arg = arg.strip()
                if command in ("/quit", "/exit"):
                    break
                try:
                    _command(command, arg, chat, loaded, images, stdout, say)
                except ChatError as e:
                    say(f"error: {e}")
                continue
            try:
                print(f"AI: {chat.answer(generator, line, settings)}", file=stdout, flush=True)
            except ChatError as e:  # a bad line does not end the session
                say(f"error: {e}")
    except KeyboardInterrupt:
        stderr.write("\n")
        return 130
    return 0


def _command(command: str, arg: str, chat: ChatSession, loaded: "Loaded", images, stdout, say) -> None:
    if command == "/image":
        if not arg:
            raise ChatError("/image needs a file: /image PATH")
        chat.add_image(load_image(arg, loaded))
        print(f"(image {chat.num_images} added)", file=stdout, flush=True)
    elif command in ("/reset", "/help") and arg:
        raise ChatError(f"{command} takes no argument")
    elif command == "/reset":
        chat.reset()
        for pixels in images:
            chat.add_image(pixels)
        kept = f"; {len(images)} image{'s' * (len(images) != 1)} from --image kept" if images else ""
        print(f"(new conversation{kept})", file=stdout, flush=True)
    elif command == "/help":
        for name, text in COMMANDS:
            say(f"  {name:<12} {text}")
        say("  a line starting with // asks it with one /")
    else:
        raise ChatError(f"unknown command {command}; commands: {command_list()} (start a question with // to "
                        "ask one that begins with /)")
