"""One server for the web chat and the API: the model being served (`Server`: loading in the background,
then the engine), and the ASGI app (FastAPI routes under /v1, Gradio at /).

The app is up before the model is: while the weights load (and the first programs compile), the API
answers 503 with Retry-After and the web page says it is loading."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
import time

from owl_jax.serving.engine import Engine, RequestSettings
from owl_jax.serving.openai_api import ApiError
from owl_jax.serving.prompts import DEFAULT_MAX_IMAGE_PIXELS, Conversation, build_prompt

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 20 * 1024 * 1024


@dataclasses.dataclass
class ServerOptions:
    """What a server allows; the CLI's options."""

    max_batch: int = 8
    max_queue: int = 64
    steps_per_call: int = 8
    batch_window: float = 0.02
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_images: int = 8
    system_prompt: str | None = None  # None: the checkpoint's (`owl_jax.chat.system_prompt`)
    warmup: bool = True
    # The defaults' stop strings are the checkpoint's conversation template's (no --stop given): a LLaVA
    # model stops at its own role markers, an mPLUG-Owl one at "Human:" / "AI:".
    stop_from_template: bool = True


class Server:
    """The model behind the routes: `status` loading | ready | failed | closed. `load(path)` (a thread) or
    `attach(loaded)` (already in memory) makes it ready."""

    def __init__(self, name: str, defaults: RequestSettings, options: ServerOptions = ServerOptions()):
        self.name, self.defaults, self.options = name, defaults, options
        self.status, self.error = "loading", ""
        self.loaded = self.engine = None
        self.created = int(time.time())
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ loading
    def load(self, checkpoint: str, **load_kwargs) -> threading.Thread:
        """Load `checkpoint` (`owl_jax.loading.load_for_inference` options) in a background thread."""

        def run():
            from owl_jax.loading import LoadError, load_for_inference
            try:
                self.attach(load_for_inference(checkpoint, **load_kwargs))
            except LoadError as e:
                self._fail(str(e).splitlines()[0])
            except Exception as e:  # a server that could not load says why instead of dying silently
                log.exception("loading %s failed", checkpoint)
                self._fail(f"{type(e).__name__}: {e}")

        thread = threading.Thread(target=run, name="owl-serving-load", daemon=True)
        thread.start()
        return thread

    def _fail(self, message: str) -> None:
        self.status, self.error = "failed", message
        log.error("cannot serve the model: %s", message)

    def attach(self, loaded, generator=None) -> "Server":
        """Serve an already loaded model (`owl_jax.loading.Loaded`); `generator` to share one."""
        from owl_jax.chat import stop_strings, system_prompt
        from owl_jax.generate import generator_for
        self.loaded = loaded
        if self.options.stop_from_template:
            self.defaults = dataclasses.replace(self.defaults, stop=stop_strings(loaded.config))
        self.generator = generator or generator_for(loaded)
        self.system_prompt = system_prompt(loaded.config, self.options.system_prompt)
        o = self.options
        self.engine = Engine(self.generator, max_batch=o.max_batch, max_queue=o.max_queue,
                             steps_per_call=o.steps_per_call, batch_window=o.batch_window).start()
        if o.warmup:
            self._warm_up()
        with self._lock:
            if self.status == "loading":
                self.status = "ready"
        return self

    def _warm_up(self) -> None:
        """Compile the batch-of-one programs of a first question (with a picture when the model has vision)
        before the server says it is ready, so the first client does not wait for XLA."""
        import numpy as np
        started = time.perf_counter()
        conversation = Conversation()
        if self.has_vision:
            conversation.add_image(np.zeros((self.image_size, self.image_size, 3), np.float32))
        for conv in ([Conversation(), conversation] if self.has_vision else [conversation]):
            prompt = build_prompt(self.loaded, conv, "Hello", max_context=self.max_context, trim=True,
                                  max_new_tokens=self.defaults.max_new_tokens, default_system=self.system_prompt)
            self.engine.submit(prompt, dataclasses.replace(self.defaults, seed=0)).collect()
        log.info("warm-up compiles took %.1f s", time.perf_counter() - started)

    def close(self) -> None:
        with self._lock:
            self.status = "closed"
        if self.engine is not None:
            self.engine.close()

    # ------------------------------------------------------------------ what the routes read
    def require_ready(self) -> None:
        if self.status == "ready":
            return
        message = {"loading": f"the model {self.name!r} is loading; retry in a few seconds",
                   "failed": f"the model {self.name!r} could not be loaded: {self.error}",
                   "closed": "the server is shutting down"}[self.status]
        raise ApiError(503, message, code="model_" + self.status if self.status != "closed" else "unavailable")

    @property
    def has_vision(self) -> bool:
        return bool(self.loaded.has_vision)

    @property
    def image_size(self) -> int:
        return self.loaded.config.model.vision.image_size

    @property
    def max_context(self) -> int:
        return self.loaded.config.model.text.max_position_embeddings

    @property
    def max_images(self) -> int:
        return self.options.max_images

    @property
    def max_image_pixels(self) -> int:
        return self.options.max_image_pixels

    @property
    def model_names(self) -> tuple[str, ...]:
        return (self.name,)

    @property
    def fingerprint(self) -> str:
        return "owl-jax-" + hashlib.sha256(self.name.encode()).hexdigest()[:10]

    def model_card(self) -> dict:
        card = {"id": self.name, "object": "model", "created": self.created, "owned_by": "owl-jax"}
        if self.loaded is not None:
            card.update(context_length=self.max_context, vision=self.has_vision)
        return card


class BodyLimit:
    """ASGI middleware: request bodies under `prefix` above `max_bytes` are answered 413 (from the
    Content-Length header at once; a chunked body when it grows past the limit)."""

    def __init__(self, app, max_bytes: int, prefix: str = "/v1"):
        self.app, self.max_bytes, self.prefix = app, max_bytes, prefix

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith(self.prefix):
            return await self.app(scope, receive, send)
        too_large = ApiError(413, f"the request body is larger than this server's limit of {self.max_bytes} bytes",
                             code="request_too_large")
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await _send_json(send, too_large.status, too_large.body())
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise too_large  # answered by the app's ApiError handler
            return message

        return await self.app(scope, limited, send)


async def _send_json(send, status: int, body: dict) -> None:
    import json
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": data})


def build_app(server: Server, *, web: bool = True):
    """The ASGI app: the API under /v1, GET /health, and (unless `web` is False) the Gradio chat at /."""
    from fastapi import FastAPI
    from owl_jax.serving.openai_api import install_error_handlers, make_router
    app = FastAPI(title="owl-jax", docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handlers(app)
    app.include_router(make_router(server))
    app.add_middleware(BodyLimit, max_bytes=server.options.max_body_bytes)

    @app.get("/health")
    async def health():
        load = server.engine.load() if server.engine is not None else {}
        return {"status": server.status, "model": server.name, **load}

    if web:
        from owl_jax.serving.web import mount_web
        mount_web(app, server)
    return app


class BackgroundServer:
    """`app` served by uvicorn in a thread on `host` (port 0: a free one), for tests and benchmarks:
    `url`, then `stop()`."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        import socket

        import uvicorn
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, port))
        self.url = f"http://{host}:{self._socket.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        name="owl-serving-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)
        self._socket.close()
