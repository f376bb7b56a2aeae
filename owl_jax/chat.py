"""A multi-turn conversation in the official mPLUG-Owl template, turned into generation prompts.

    {system}
    Human: <image>
    Human: {question}
    AI: {answer}
    Human: {next question}
    AI: <- generation continues here

Images are human lines of their own, placed where they were added (before the next question), as in the
released instruction data. Prompts are tokenised by `data_pipelines.tokenize.to_prompt`, i.e. exactly as
training tokenised the same conversation. Answers are cut at a new role marker (a model that keeps going
would otherwise write the human's next turn), so the history always renders back to a valid conversation.
When a prompt and its answer would not fit the context (`max_position_embeddings`), the oldest
question/answer turns are dropped (images stay), then the answer is given what room is left.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from data_pipelines.conversation import AI, HUMAN, IMAGE_TAG, SYSTEM_PROMPT, BadRecord

if TYPE_CHECKING:
    from owl_jax.config import Config
    from owl_jax.generate import Generator, GenerationSettings, Prompt
    from owl_jax.loading import Loaded

#: Stop strings for chat: the model starting the next turn itself.
DEFAULT_STOP = ("\nHuman:", "\nAI:")
_MARKERS = ("\nHuman:", "\nAI:")


class ChatError(ValueError):
    """A question, image or history that cannot become a prompt; one line, shown to the user."""


def system_prompt(cfg: "Config", override: str | None = None) -> str:
    """The system prompt to chat with: `override`, else the run's `data.system_prompt` (None = official)."""
    if override is not None:
        return override
    return SYSTEM_PROMPT if cfg.data.system_prompt is None else cfg.data.system_prompt


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


def clean_answer(text: str) -> str:
    """The answer up to a new role marker, stripped."""
    cuts = [text.index(m) for m in _MARKERS if m in text]
    return (text[:min(cuts)] if cuts else text).strip()


class ChatSession:
    """The turns and images of one conversation. `prompt` builds the next prompt without changing the
    session; `record` appends a question and its answer (so batched callers can generate in between)."""

    def __init__(self, tokenizer, *, tokens_per_image: int, system: str, max_context: int):
        self.tokenizer, self.tokens_per_image = tokenizer, tokens_per_image
        self.system, self.max_context = system, max_context
        self.turns: list[tuple[str, str]] = []
        self.images: list[np.ndarray] = []

    @classmethod
    def for_config(cls, cfg: "Config", tokenizer, *, system: str | None = None) -> "ChatSession":
        """A session with the model's image slots and context (`max_position_embeddings`) and the system
        prompt of `system_prompt(cfg, system)`."""
        return cls(tokenizer, tokens_per_image=cfg.model.tokens_per_image, system=system_prompt(cfg, system),
                   max_context=cfg.model.text.max_position_embeddings)

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
        the prompt plus `max_new_tokens` would exceed the context (see `room` for what is left)."""
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
                                   images=["image"] * len(self.images), system=self.system)
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
        return Prompt(tokens, pixels)

    def record(self, question: str, answer: str) -> str:
        """Append the turn; returns the cleaned answer (an empty answer leaves only the question)."""
        answer = clean_answer(answer)
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
        settings = fit_settings(settings, [self.room(prompt)])
        return self.record(question, generator.generate([prompt], settings)[0].text)


def fit_settings(settings: "GenerationSettings", rooms: list[int]) -> "GenerationSettings":
    """`settings` with max_new_tokens lowered to what fits after every prompt of a batch."""
    import dataclasses
    return dataclasses.replace(settings, max_new_tokens=max(1, min(settings.max_new_tokens, *rooms)))
