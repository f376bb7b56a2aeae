"""Serving a model: a batching, streaming engine over the jitted decoder (`engine`), an OpenAI-compatible HTTP
API (`openai_api`), a Gradio web chat (`web`), and the app that puts both on one server (`app`); the
command line is `python -m owl_jax.serve`.

Nothing here imports gradio, fastapi or uvicorn at package import time: the engine works without the
`serve` extra (benchmarks, tests)."""
