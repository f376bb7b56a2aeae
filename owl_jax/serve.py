"""Serve a model: a web chat and an OpenAI-compatible API on one server.

    python -m owl_jax.serve --checkpoint DIR [--host 127.0.0.1] [--port 7860] [--api-only] [--max-batch N]

`DIR` is anything `owl_jax.generate` accepts (a training run or step, an official mPLUG-Owl layout directory,
a `LlamaForCausalLM` directory). The chat page is at http://HOST:PORT/, the API at http://HOST:PORT/v1
(`POST /v1/chat/completions`, `GET /v1/models`; see `owl_jax.serving.openai_api`). The server listens on
127.0.0.1 unless told otherwise (there is no authentication: bind another address only on a network you
trust), fetches nothing (images come inline), and reads weights only from safetensors / Orbax
checkpoints (`owl_jax.loading`). Needs the `serve` extra (`pip install -e ".[serve]"`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence


def _parser() -> argparse.ArgumentParser:
    from owl_jax.generate import add_generation_arguments, add_model_arguments
    parser = argparse.ArgumentParser(prog="python -m owl_jax.serve", description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--api-only", action="store_true", help="serve the API without the web chat")
    parser.add_argument("--name", help="the model's name in the API (default: the checkpoint directory's name)")
    s = parser.add_argument_group("serving")
    s.add_argument("--max-batch", type=int, default=8, help="most requests generated together (default 8)")
    s.add_argument("--max-queue", type=int, default=64,
                   help="most requests waiting for a batch; beyond it requests are answered 429 (default 64)")
    s.add_argument("--stream-chunk", type=int, default=8,
                   help="decode steps per jitted call: tokens reach clients in chunks of this size (default 8)")
    s.add_argument("--batch-window-ms", type=float, default=20.0,
                   help="when idle, wait this long after a request for others to batch with it (default 20)")
    s.add_argument("--max-body-mb", type=float, default=20.0, help="largest request body (default 20 MB)")
    s.add_argument("--max-image-pixels", type=int, default=None,
                   help="largest picture accepted, in pixels (default 40 million)")
    s.add_argument("--no-warmup", action="store_true", help="do not compile the first programs before serving")
    add_generation_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    for flag, value, low in (("--max-batch", args.max_batch, 1), ("--max-queue", args.max_queue, 1),
                             ("--stream-chunk", args.stream_chunk, 1), ("--max-new-tokens", args.max_new_tokens, 1),
                             ("--port", args.port, 0)):
        if value < low:
            parser.error(f"{flag} must be at least {low}")
    try:
        import fastapi  # noqa: F401
        import uvicorn
        if not args.api_only:
            import gradio  # noqa: F401
    except ImportError as e:
        print(f"error: serving needs the serve extra ({e.name} is missing): pip install -e \".[serve]\"", file=sys.stderr)
        return 2
    from owl_jax.generate import settings_from_args
    from owl_jax.loading import LoadError, checkpoint_kind, model_name
    from owl_jax.serving.app import Server, ServerOptions, build_app
    from owl_jax.serving.engine import RequestSettings
    from owl_jax.serving.prompts import DEFAULT_MAX_IMAGE_PIXELS
    try:
        checkpoint_kind(args.checkpoint)  # a wrong path fails now, in one line, not in the background
        generation = settings_from_args(args)
    except (LoadError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    defaults = RequestSettings(max_new_tokens=generation.max_new_tokens, sampling=generation.sampling,
                               stop=generation.stop_strings, seed=None)
    options = ServerOptions(max_batch=args.max_batch, max_queue=args.max_queue, steps_per_call=args.stream_chunk,
                            batch_window=args.batch_window_ms / 1000, max_body_bytes=int(args.max_body_mb * 2 ** 20),
                            max_image_pixels=args.max_image_pixels or DEFAULT_MAX_IMAGE_PIXELS,
                            system_prompt=args.system_prompt, warmup=not args.no_warmup,
                            stop_from_template=args.stop is None)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("owl_jax").addHandler(handler)  # the server's own messages, not every library's
    logging.getLogger("owl_jax").setLevel(logging.INFO)
    server = Server(args.name or model_name(args.checkpoint), defaults, options)
    app = build_app(server, web=not args.api_only)
    server.load(args.checkpoint, tokenizer=args.tokenizer, lora=args.lora, merge_lora=args.merge_lora,
                scan_layers=args.scan_layers, qformer_tokenizer=args.qformer_tokenizer)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {args.host}: anyone who can reach it can use the model (there is no "
              "authentication)", file=sys.stderr)
    where = f"http://{args.host if ':' not in args.host else f'[{args.host}]'}:{args.port}"
    print(f"serving {server.name}: {'' if args.api_only else f'chat at {where}/, '}API at {where}/v1 "
          f"(loading the model; the API answers 503 until it is ready)", file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5)
    except (OSError, SystemExit) as e:  # the port is taken, the address does not exist
        print(f"error: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 2
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    sys.exit(main())
