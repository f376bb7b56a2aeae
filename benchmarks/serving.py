"""Serving load: N concurrent streamed clients against one `owl_jax.serve` server vs the same N requests
one after another, through the real HTTP stack (uvicorn, the OpenAI-compatible API, the official
`openai` client), on one random mPLUG-Owl-shaped model.

Why: batching is the point of the engine. Sequential serving runs every request as a batch of one; with
N clients at once the engine batches them into one generation (up to --max-batch rows), so on hardware
where a decode step costs about the same for 1 and 16 rows, throughput grows with the batch. This
reports, per mode: wall time, completion tokens/s (all clients together), time to the first streamed
token and whole-request latency (median and worst), the batch sizes the engine formed and the programs
it compiled, and the throughput ratio concurrent / sequential (goal: >= 4 at 16 clients).

Every request carries one picture and asks its own question; greedy; EOS is ignored (random weights)
so every answer is exactly --new-tokens long. Compiles are excluded: both modes run once untimed first.

    PYTHONPATH=. JAX_PLATFORMS=cpu python benchmarks/serving.py [--clients 16] [--new-tokens 64]
        [--max-batch 16] [--stream-chunk 8] [--hidden 256] [--layers 4] [--vocab 2048] [--repeats 2]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import io
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model(args):
    from data_pipelines.tokenizers import load_tokenizer
    from owl_jax.config import load_config
    from owl_jax.loading import Loaded
    from owl_jax.models.owl import build_model
    cfg = load_config(os.path.join(ROOT, "configs/tiny_test.yaml"), [
        f"model.text.hidden_size={args.hidden}", f"model.text.intermediate_size={int(args.hidden * 8 / 3) // 16 * 16}",
        f"model.text.num_layers={args.layers}", f"model.text.vocab_size={args.vocab}",
        "model.text.max_position_embeddings=1024", f"data.tokenizer=toy:{args.vocab}", "data.system_prompt=''"])
    model = build_model(cfg.model, seed=0)
    model.eval()
    return Loaded(config=cfg, model=model, tokenizer=load_tokenizer(f"toy:{args.vocab}"), kind="run", has_vision=True)


def _picture(seed: int) -> str:
    import numpy as np
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@dataclasses.dataclass
class Timing:
    first: float  # seconds to the first streamed text
    total: float
    tokens: int


async def _one(client, i: int, picture: str, new_tokens: int, start: float) -> Timing:
    stream = await client.chat.completions.create(
        model="bench", max_tokens=new_tokens, temperature=0, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": picture}},
                                               {"type": "text", "text": f"question {i}: what is in the picture?"}]}])
    first, tokens = None, 0
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.perf_counter() - start
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return Timing(first or 0.0, time.perf_counter() - start, tokens)


async def _run(url: str, clients: int, new_tokens: int, concurrent: bool) -> tuple[float, list[Timing]]:
    import openai
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    pictures = [_picture(i) for i in range(clients)]
    try:
        start = time.perf_counter()
        if concurrent:
            timings = await asyncio.gather(*(_one(client, i, pictures[i], new_tokens, start) for i in range(clients)))
        else:
            timings = []
            for i in range(clients):
                t0 = time.perf_counter()
                timings.append(await _one(client, i, pictures[i], new_tokens, t0))
        return time.perf_counter() - start, list(timings)
    finally:
        await client.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--stream-chunk", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per mode (the best is reported)")
    args = parser.parse_args(argv)

    import jax

    from owl_jax.compile_counter import count_compiles
    from owl_jax.sampling import SamplingParams
    from owl_jax.serving.app import BackgroundServer, Server, ServerOptions, build_app
    from owl_jax.serving.engine import RequestSettings

    loaded = _model(args)
    defaults = RequestSettings(max_new_tokens=args.new_tokens, sampling=SamplingParams(), stop=(), stop_at_eos=False)
    server = Server("bench", defaults, ServerOptions(max_batch=args.max_batch, max_queue=4 * args.clients,
                                                     steps_per_call=args.stream_chunk, warmup=False)).attach(loaded)
    http = BackgroundServer(build_app(server, web=False))
    results = {}
    try:
        for mode in ("sequential", "concurrent"):
            asyncio.run(_run(http.url, args.clients, args.new_tokens, mode == "concurrent"))  # compiles
            best = None
            before = server.engine.batch_sizes.copy()
            with count_compiles() as compiles:
                for _ in range(args.repeats):
                    wall, timings = asyncio.run(_run(http.url, args.clients, args.new_tokens, mode == "concurrent"))
                    if best is None or wall < best[0]:
                        best = (wall, timings)
            sizes = server.engine.batch_sizes - before
            results[mode] = (*best, sizes, compiles.total)
    finally:
        http.stop()
        server.close()

    cfg = loaded.config.model
    print(f"model: random mPLUG-Owl, LLM hidden {cfg.text.hidden_size} x {cfg.text.num_layers} layers, vocab "
          f"{cfg.text.vocab_size}, vision {cfg.vision.hidden_size} x {cfg.vision.num_layers} @ {cfg.vision.image_size}px, "
          f"{cfg.tokens_per_image} tokens/image; {args.clients} clients x {args.new_tokens} new tokens, greedy, "
          f"one picture each; max batch {args.max_batch}, stream chunk {args.stream_chunk}")
    print(f"devices: {jax.devices()[0].platform} ({os.cpu_count()} cores), jax {jax.__version__}")
    print("| mode | wall s | tokens/s | first token median / max s | latency median / max s | batches (rows: count) "
          "| compiles while timed |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for mode, (wall, timings, sizes, compiles) in results.items():
        tokens = sum(t.tokens for t in timings)
        firsts, totals = [t.first for t in timings], [t.total for t in timings]
        batches = ", ".join(f"{k}: {v}" for k, v in sorted(sizes.items()))
        print(f"| {mode} | {wall:.2f} | {tokens / wall:.1f} | {statistics.median(firsts):.3f} / {max(firsts):.3f} | "
              f"{statistics.median(totals):.3f} / {max(totals):.3f} | {batches} | {compiles} |")
    seq, con = results["sequential"], results["concurrent"]
    ratio = (sum(t.tokens for t in con[1]) / con[0]) / (sum(t.tokens for t in seq[1]) / seq[0])
    print(f"throughput concurrent / sequential: {ratio:.2f}x")
    assert all(t.tokens == args.new_tokens for r in results.values() for t in r[1]), "an answer was cut short"
    return 0


if __name__ == "__main__":
    sys.exit(main())
