"""Generation speed: owl-jax's KV-cache generator vs transformers `generate`, same model, same CPU, one run.

Why: generation is where a port usually loses to the reference (a recompile per prompt, a cache that is
copied each step, host round trips per token). This measures, on one random tiny `LlamaForCausalLM`
written by transformers and imported by owl-jax (`owl_jax.loading`, the `hf-llama` path):

- prefill: the time to the first token's logits for a prompt (ours: the jitted prefill, cache allocation
  included; transformers: one forward with `use_cache=True`);
- decode: new tokens per second after the prefill (generate time minus prefill time, over the new tokens),
  greedy, EOS off so both produce exactly `--new-tokens` tokens;

each the median of `--repeats` timed runs after one warm-up run (so compile time is excluded and
reported separately), and the ratios. It also checks that both produce the same greedy tokens.

    PYTHONPATH=. JAX_PLATFORMS=cpu python benchmarks/generation.py [--batch 1] [--prompt-len 100]
        [--new-tokens 128] [--repeats 5] [--hidden 256] [--layers 4] [--heads 8] [--kv-heads 4] [--vocab 2048]
        [--torch-threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=100)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--torch-threads", type=int, default=0, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)

    import jax
    import numpy as np
    import torch
    import transformers

    from owl_jax.generate import GenerationSettings, Generator, Prompt
    from owl_jax.loading import load_for_inference

    config = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                                      intermediate_size=int(args.hidden * 8 / 3) // 16 * 16,
                                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                      num_key_value_heads=args.kv_heads, max_position_embeddings=4096,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # weights at a scale where greedy choices are not near-ties (HF's init is 0.02)
        for name, p in hf.named_parameters():
            if p.ndim == 2:
                p.normal_(0.0, 1.0 if "embed" in name else p.shape[1] ** -0.5)
    hf.generation_config.eos_token_id = None  # both sides produce exactly --new-tokens tokens
    rng = np.random.default_rng(0)
    ids = rng.integers(3, args.vocab, size=(args.batch, args.prompt_len))
    ids[:, 0] = 1
    with tempfile.TemporaryDirectory() as directory:
        hf.save_pretrained(directory, safe_serialization=True)
        loaded = load_for_inference(directory, tokenizer=f"toy:{args.vocab}")
    cfg = loaded.config.model
    generator = Generator(loaded.model, loaded.tokenizer, tokens_per_image=cfg.tokens_per_image,
                          image_size=cfg.vision.image_size)
    prompts = [Prompt(row.astype(np.int32)) for row in ids]
    settings = GenerationSettings(max_new_tokens=args.new_tokens, stop_at_eos=False)

    start = time.perf_counter()
    ours_tokens = [g.tokens for g in generator.generate(prompts, settings)]
    first_call = time.perf_counter() - start
    ours_prefill = _median_time(lambda: generator.next_token_logits(prompts), args.repeats)
    ours_total = _median_time(lambda: generator.generate(prompts, settings), args.repeats)

    input_ids = torch.from_numpy(ids)
    mask = torch.ones_like(input_ids)

    def hf_generate():
        with torch.no_grad():
            return hf.generate(input_ids, attention_mask=mask, max_new_tokens=args.new_tokens, do_sample=False,
                               pad_token_id=0)

    def hf_prefill():
        with torch.no_grad():
            hf(input_ids=input_ids, attention_mask=mask, use_cache=True)

    hf_tokens = hf_generate()[:, args.prompt_len:].tolist()
    hf_prefill_t = _median_time(hf_prefill, args.repeats)
    hf_total = _median_time(hf_generate, args.repeats)

    new = args.batch * args.new_tokens
    ours_decode = new / max(ours_total - ours_prefill, 1e-9)
    hf_decode = new / max(hf_total - hf_prefill_t, 1e-9)
    print(f"model: LLaMA hidden {args.hidden}, {args.layers} layers, {args.heads} heads / {args.kv_heads} kv, "
          f"vocab {args.vocab}; batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy")
    print(f"devices: jax {jax.devices()[0].platform} ({os.cpu_count()} cores), torch {torch.get_num_threads()} "
          f"threads; jax {jax.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"owl-jax first call (compiles prefill + decode): {first_call:.2f} s")
    print(f"prefill:  owl-jax {1e3 * ours_prefill:8.2f} ms   transformers {1e3 * hf_prefill_t:8.2f} ms   "
          f"speed-up {hf_prefill_t / ours_prefill:.2f}x")
    print(f"decode:   owl-jax {ours_decode:8.1f} tok/s transformers {hf_decode:8.1f} tok/s   "
          f"ratio {ours_decode / hf_decode:.2f}x")
    same = ours_tokens == hf_tokens
    print(f"greedy tokens identical: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
