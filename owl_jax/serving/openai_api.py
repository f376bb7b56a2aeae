"""The OpenAI-compatible API: `POST /v1/chat/completions` (streamed as server-sent events or not) and
`GET /v1/models`, answered by the serving engine.

Requests follow OpenAI's chat completions schema; what this server cannot honour is refused with a 400
naming the field rather than ignored (an unknown field, `n` > 1, penalties it does not implement, a
remote image URL: the server fetches nothing, images come inline as base64 data URLs). Extensions, as
other OpenAI-compatible servers name them: `top_k`, `repetition_penalty`, `no_repeat_ngram_size`.
Every error is OpenAI's error object `{"error": {"message", "type", "param", "code"}}` with the status
OpenAI uses: 400 bad request, 404 unknown model or path, 413 body too large, 429 queue full, 503 while
the model loads or the server shuts down.

Sampling: `temperature` 0 is greedy, > 0 samples at that temperature; without `temperature` (and
without `top_p` / `top_k`) the server's defaults apply (its `--preset` and sampling options). Stop
strings add to the template's own (a new `Human:` / `AI:` line). Answers are cut there and stripped,
like `owl_jax.generate`'s, so a greedy answer here equals that command's for the same conversation.
"""

import asyncio
import dataclasses
import json
import time
import uuid
from typing import Any, Optional

from owl_jax.sampling import SamplingParams
from owl_jax.serving.engine import EngineError, Finished, RequestSettings
from owl_jax.serving.prompts import AI, HUMAN, BadInput, Conversation, build_prompt, data_url_bytes, image_pixels

#: Fields of OpenAI's chat completion request that are accepted (some only at their neutral value).
_FIELDS = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "seed",
           "stream", "stream_options", "n", "user", "presence_penalty", "frequency_penalty", "logprobs",
           "top_logprobs", "response_format", "top_k", "repetition_penalty", "no_repeat_ngram_size"}
MAX_STOPS = 4  # as OpenAI


class ApiError(Exception):
    """An error answer in OpenAI's shape."""

    TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 405: "invalid_request_error",
             413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, *, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return error_body(self.status, self.message, param=self.param, code=self.code)


def error_body(status: int, message: str, *, param: Optional[str] = None, code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": ApiError.TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def _bad(message: str, param: Optional[str] = None, code: Optional[str] = None) -> "ApiError":
    return ApiError(400, message, param=param, code=code)


# ---------------------------------------------------------------------- request parsing


@dataclasses.dataclass
class ChatRequest:
    conversation: Conversation
    question: str
    settings: RequestSettings
    max_tokens: int
    stream: bool
    include_usage: bool


def _number(body: dict, key: str, kind: type, lo: Optional[float] = None, hi: Optional[float] = None, *,
            lo_open: bool = False):
    value = body.get(key)
    if value is None:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        ok = ok and float(value).is_integer()
    if not ok:
        raise _bad(f"{key} must be {'an integer' if kind is int else 'a number'}, got {json.dumps(value)[:40]}", key)
    value = kind(value)
    if lo is not None and (value < lo or (lo_open and value == lo)) or hi is not None and value > hi:
        bounds = f"{'>' if lo_open else '>='} {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise _bad(f"{key} must be {bounds}, got {value}", key)
    return value


def _sampling(body: dict, default: SamplingParams) -> SamplingParams:
    temperature = _number(body, "temperature", float, 0, 2)
    top_p = _number(body, "top_p", float, 0, 1, lo_open=True)
    top_k = _number(body, "top_k", int, 0)
    penalty = _number(body, "repetition_penalty", float, 0, lo_open=True)
    ngram = _number(body, "no_repeat_ngram_size", int, 0)
    for key in ("presence_penalty", "frequency_penalty"):
        if _number(body, key, float, -2, 2) not in (None, 0):
            raise _bad(f"{key} is not supported by this server (use repetition_penalty)", key)
    changes: dict[str, Any] = {}
    if temperature is not None:
        changes["do_sample"] = temperature > 0
        if temperature > 0:
            changes["temperature"] = temperature
    elif top_p is not None or top_k is not None:
        changes["do_sample"] = True
    for field, value in (("top_p", top_p), ("top_k", top_k), ("repetition_penalty", penalty),
                         ("no_repeat_ngram_size", ngram)):
        if value is not None:
            changes[field] = value
    sampling = dataclasses.replace(default, **changes)
    if not sampling.do_sample:  # greedy: the sampling-only values do not matter, so greedy requests batch together
        sampling = dataclasses.replace(sampling, temperature=1.0, top_k=0, top_p=1.0)
    return sampling


def _content_parts(message: dict, index: int) -> list[dict]:
    content = message.get("content")
    param = f"messages[{index}].content"
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list) or not content:
        raise _bad("content must be a string or a non-empty list of content parts", param)
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in ("text", "image_url"):
            raise _bad("content parts must be {\"type\": \"text\"} or {\"type\": \"image_url\"} objects",
                       f"{param}[{j}]")
    return content


def parse_chat_request(body: Any, server) -> ChatRequest:
    """A chat completion request (parsed JSON) checked and turned into a conversation; ApiError for
    anything the server cannot answer. Images are decoded here (call it off the event loop)."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    unknown = sorted(set(body) - _FIELDS)
    if unknown:
        raise _bad(f"Unrecognized request argument supplied: {unknown[0]}", unknown[0])
    model = body.get("model")
    if not isinstance(model, str):
        raise _bad("model is required (GET /v1/models lists it)", "model")
    if model not in server.model_names:
        raise ApiError(404, f"The model {model!r} does not exist; this server serves {server.name!r}",
                       param="model", code="model_not_found")
    if _number(body, "n", int, 1) not in (None, 1):
        raise _bad("only n=1 is supported", "n")
    if body.get("logprobs") not in (None, False) or body.get("top_logprobs") is not None:
        raise _bad("logprobs are not supported", "logprobs")
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise _bad("only response_format {\"type\": \"text\"} is supported", "response_format")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise _bad("user must be a string", "user")
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise _bad("stream must be a boolean", "stream")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise _bad("stream_options may only hold include_usage", "stream_options")
    include_usage = bool((options or {}).get("include_usage", False))
    max_tokens = _number(body, "max_completion_tokens", int, 1)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", int, 1)
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or len(stop) > MAX_STOPS
                             or not all(isinstance(s, str) and s for s in stop)):
        raise _bad(f"stop must be a non-empty string or a list of up to {MAX_STOPS} of them", "stop")
    seed = _number(body, "seed", int)
    try:
        sampling = _sampling(body, server.defaults.sampling)
    except ValueError as e:  # SamplingParams' own checks
        raise _bad(str(e)) from None
    conversation, question = _conversation(body.get("messages"), server)
    defaults = server.defaults
    settings = RequestSettings(max_new_tokens=max_tokens or defaults.max_new_tokens, sampling=sampling,
                               stop=tuple(dict.fromkeys([*defaults.stop, *(stop or [])])),
                               seed=None if seed is None else seed & 0x7FFFFFFF, stop_at_eos=defaults.stop_at_eos)
    return ChatRequest(conversation, question, settings, settings.max_new_tokens, bool(stream), include_usage)


def _conversation(messages: Any, server) -> tuple[Conversation, str]:
    if not isinstance(messages, list) or not messages:
        raise _bad("messages must be a non-empty list", "messages")
    conversation = Conversation()
    systems: list[str] = []
    question = None
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _bad("each message must be an object with a role and content", f"messages[{i}]")
        role = message.get("role")
        parts = _content_parts(message, i)
        texts = [p.get("text") for p in parts if p["type"] == "text"]
        if not all(isinstance(t, str) for t in texts):
            raise _bad("a text part needs a string text", f"messages[{i}].content")
        text = "\n".join(texts).strip()
        images = [(j, p) for j, p in enumerate(parts) if p["type"] == "image_url"]
        if role in ("system", "developer"):
            if images:
                raise _bad("images belong in user messages", f"messages[{i}].content")
            systems.append(text)
            continue
        if role not in ("user", "assistant"):
            raise _bad(f"role must be system, developer, user or assistant, got {role!r}", f"messages[{i}].role")
        if question:  # the previous user message was not the last one: it is history
            conversation.turns.append((HUMAN, question))
        question = None
        if role == "assistant":
            if images:
                raise _bad("images belong in user messages", f"messages[{i}].content")
            if text:
                conversation.turns.append((AI, text))
            continue
        for j, part in images:
            param = f"messages[{i}].content[{j}].image_url"
            if not server.has_vision:
                raise _bad(f"the model {server.name!r} is text-only; it cannot read images", param, "images_not_supported")
            if len(conversation.images) >= server.max_images:
                raise _bad(f"at most {server.max_images} images per request", param, "too_many_images")
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            data = data_url_bytes(url, param)
            conversation.add_image(image_pixels(data, server.image_size, max_pixels=server.max_image_pixels,
                                                what=f"the image of {param}"))
        question = text
    if messages and (not isinstance(messages[-1], dict) or messages[-1].get("role") != "user"):
        raise _bad("the last message must be the user's", "messages")
    if not question:
        raise _bad("the last user message has no text to answer", "messages")
    if systems:
        conversation.system = "\n".join(systems)
    return conversation, question


# ---------------------------------------------------------------------- the routes


def _completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def _usage(result: Finished) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


def _finish_reason(result: Finished) -> str:
    return "length" if result.finish_reason == "length" else "stop"


async def _watch_disconnect(request, stream) -> None:
    """Cancel `stream` when the client goes away (the body has been read: the next message is the end)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            stream.cancel()
            return


def make_router(server):
    """The /v1 routes for `server` (an `owl_jax.serving.app.Server`)."""
    from fastapi import APIRouter, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    router = APIRouter(prefix="/v1")

    @router.get("/models")
    async def models():
        server.require_ready()
        return {"object": "list", "data": [server.model_card()]}

    @router.get("/models/{model_id:path}")
    async def model(model_id: str):
        server.require_ready()
        if model_id not in server.model_names:
            raise ApiError(404, f"The model {model_id!r} does not exist", param="model", code="model_not_found")
        return server.model_card()

    @router.post("/chat/completions")
    async def chat_completions(request: Request):
        server.require_ready()
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, ValueError) as e:
            raise _bad(f"the request body is not valid JSON ({str(e)[:100]})") from None
        loop = asyncio.get_running_loop()
        parsed, prompt = await asyncio.to_thread(_prepare, body, server)
        try:
            stream = server.engine.submit(prompt, parsed.settings, loop=loop)
        except EngineError as e:
            raise ApiError(e.status, str(e), code="queue_full" if e.status == 429 else "unavailable") from None
        cid, created = _completion_id(), int(time.time())
        if not parsed.stream:
            watcher = asyncio.create_task(_watch_disconnect(request, stream))
            try:
                result = await stream.acollect()
            except EngineError as e:  # shut down while waiting
                raise ApiError(e.status, str(e), code="unavailable") from None
            finally:
                watcher.cancel()
            return JSONResponse({
                "id": cid, "object": "chat.completion", "created": created, "model": server.name,
                "system_fingerprint": server.fingerprint,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                             "logprobs": None, "finish_reason": _finish_reason(result)}],
                "usage": _usage(result)})
        return StreamingResponse(_events(stream, cid, created, parsed.include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def _chunk(cid: str, created: int, delta: dict, finish: Optional[str]) -> str:
        data = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": server.name,
                "system_fingerprint": server.fingerprint,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        return f"data: {json.dumps(data)}\n\n"

    async def _events(stream, cid: str, created: int, include_usage: bool):
        try:
            yield _chunk(cid, created, {"role": "assistant", "content": ""}, None)
            async for event in stream:
                if isinstance(event, str):
                    yield _chunk(cid, created, {"content": event}, None)
                else:
                    yield _chunk(cid, created, {}, _finish_reason(event))
                    if include_usage:
                        usage = {"id": cid, "object": "chat.completion.chunk", "created": created,
                                 "model": server.name, "choices": [], "usage": _usage(event)}
                        yield f"data: {json.dumps(usage)}\n\n"
        except Exception as e:  # after the headers went out: an error event, then the end
            yield f"data: {json.dumps(error_body(500, str(e)))}\n\n"
        finally:
            stream.cancel()  # a client that went away (or a finished stream: a no-op) frees its row
        yield "data: [DONE]\n\n"

    return router


def _prepare(body: Any, server):
    """(request, prompt): parsing, image decoding and tokenisation, run in a worker thread."""
    parsed = parse_chat_request(body, server)
    try:
        prompt = build_prompt(server.loaded, parsed.conversation, parsed.question, max_context=server.max_context,
                              trim=False, max_new_tokens=parsed.max_tokens, default_system=server.system_prompt)
    except BadInput as e:
        raise _bad(str(e), e.param, e.code) from None
    return parsed, prompt


def install_error_handlers(app) -> None:
    """OpenAI-shaped errors for the API (and for unknown /v1 paths); other paths keep their own."""
    from fastapi.exception_handlers import http_exception_handler
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        headers = {"Retry-After": "5"} if exc.status in (429, 503) else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(BadInput)
    async def bad_input(request, exc: BadInput):
        return JSONResponse(error_body(400, str(exc), param=exc.param, code=exc.code), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        if request.url.path.startswith("/v1"):
            message = {404: f"unknown path {request.url.path}", 405: f"{request.method} is not allowed on "
                       f"{request.url.path}"}.get(exc.status_code, str(exc.detail))
            return JSONResponse(error_body(exc.status_code, message), status_code=exc.status_code)
        return await http_exception_handler(request, exc)

    @app.exception_handler(Exception)
    async def internal(request, exc: Exception):
        return JSONResponse(error_body(500, f"internal error: {type(exc).__name__}"), status_code=500)
