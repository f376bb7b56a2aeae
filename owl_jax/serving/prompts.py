"""From what a client sends to a generation prompt: images from bytes (under a pixel limit), data URLs, and
conversations in the model's own template (`owl_jax.chat.ChatSession`, the same tokenisation as training
and `owl_jax.generate`). Every user mistake is a `BadInput` with one line; nothing here fetches anything."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import re

import numpy as np

from data_pipelines.conversation import AI, HUMAN, IMAGE_TAG

#: Images above this many pixels are refused from the header, before decoding (10000 x 10000 is 100 MP).
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,",
                       re.ASCII)


class BadInput(ValueError):
    """Input that cannot become a prompt (a 400 answer); `param` names the offending request field."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


def image_pixels(data: bytes, size: int, *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, what: str = "image") -> np.ndarray:
    """[size, size, 3] CLIP-normalised pixels of encoded image bytes (the official inference preprocessing,
    as `owl_jax.chat.read_image`), or BadInput: not an image, truncated or corrupt, above `max_pixels`."""
    from data_pipelines import images as image_ops
    try:
        image = image_ops.decode_image(data, max_pixels=max_pixels)
    except image_ops.BadSample as e:
        if e.reason == "decompression_bomb":
            detail = str(e).split(": ", 1)[-1]
            raise BadInput(f"{what} is too large ({detail}); send a smaller picture", code="image_too_large") from None
        if e.reason == "empty_image":
            raise BadInput(f"{what} is empty", code="invalid_image") from None
        raise BadInput(f"{what} is not a readable JPEG/PNG image ({str(e).split(': ', 1)[-1][:160]})",
                       code="invalid_image") from None
    return image_ops.preprocess(image, size, train=False)


def data_url_bytes(url: str, param: str) -> bytes:
    """The bytes of a base64 `data:image/...` URL; BadInput for anything else (remote URLs are refused: the
    server fetches nothing)."""
    if not isinstance(url, str) or not url:
        raise BadInput("image_url.url must be a non-empty string", param)
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme in ("http", "https", "ftp", "file"):
        raise BadInput(f"{scheme} image URLs are not supported: this server fetches nothing; send the image inline "
                       "as a data URL (data:image/png;base64,...)", param, "unsupported_image_url")
    m = _DATA_URL.match(url)
    if scheme != "data" or m is None:
        raise BadInput("image_url.url must be a data URL (data:image/png;base64,...)", param, "invalid_image_url")
    if not m.group("b64"):
        raise BadInput("image data URLs must be base64-encoded (data:image/png;base64,...)", param, "invalid_image_url")
    mime = (m.group("mime") or "").lower()
    if mime and not mime.startswith("image/"):
        raise BadInput(f"the data URL holds {mime}, not an image", param, "invalid_image")
    try:
        return base64.b64decode(url[m.end():], validate=True)
    except (binascii.Error, ValueError):
        raise BadInput("the image data URL is not valid base64", param, "invalid_image_url") from None


@dataclasses.dataclass
class Conversation:
    """Turns in `ChatSession` form ((HUMAN|AI, text), images as (HUMAN, IMAGE_TAG)) before the question."""

    turns: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    images: list[np.ndarray] = dataclasses.field(default_factory=list)
    system: str | None = None

    def add_image(self, pixels: np.ndarray) -> None:
        self.turns.append((HUMAN, IMAGE_TAG))
        self.images.append(np.asarray(pixels, np.float32))


def build_prompt(loaded, conversation: Conversation, question: str, *, max_context: int, trim: bool,
                 max_new_tokens: int, default_system: str):
    """The `Prompt` asking `question` after `conversation`, with `max_new_tokens` capped to the room its
    context leaves. `trim`: drop the oldest question/answer turns while the prompt and `max_new_tokens`
    would not fit (the web chat, as the terminal chat does); else a prompt that does not fit is refused
    (BadInput, code context_length_exceeded: the API, as OpenAI's)."""
    from owl_jax.chat import ChatError, ChatSession, template_for
    from owl_jax.data import qformer_tokenizer_for
    system = default_system if conversation.system is None else conversation.system
    session = ChatSession(loaded.tokenizer, tokens_per_image=loaded.config.model.tokens_per_image, system=system,
                          max_context=max_context if trim else 1 << 40, template=template_for(loaded.config),
                          qformer_tokenizer=qformer_tokenizer_for(loaded.config))
    session.turns, session.images = list(conversation.turns), list(conversation.images)
    try:
        prompt = session.prompt(question, max_new_tokens=max_new_tokens if trim else 0)
    except ChatError as e:
        if "leaves no room" in str(e):
            raise BadInput(str(e), "messages", "context_length_exceeded") from None
        raise BadInput(str(e), "messages") from None
    if len(prompt.tokens) >= max_context:
        raise BadInput(f"the conversation is {len(prompt.tokens)} tokens, which leaves no room for an answer in the "
                       f"model's context of {max_context} tokens", "messages", "context_length_exceeded")
    room = max_context - len(prompt.tokens)
    return dataclasses.replace(prompt, max_new_tokens=min(room, max_new_tokens))


__all__ = ["AI", "HUMAN", "IMAGE_TAG", "BadInput", "Conversation", "build_prompt", "data_url_bytes", "image_pixels"]
