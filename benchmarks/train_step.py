"""Train-step throughput: step time, trained tokens/s, images/s, model TFLOP/s and MFU, for the tiny
(demo) and a ~100M-parameter model, stage 1 and stage 2; remat policies; padded vs packed batches.

Every case is a real training run (`owl_jax.train.run`: the real pipelines on the demo world, the real
jitted step), timed from its `metrics.jsonl` after `--warmup` steps (compile excluded). Model FLOPs are
`owl_jax.flops.step_flops` of the step's shapes; MFU needs a chip with a known peak (`owl_jax.chips`),
so on CPU only TFLOP/s are shown. Ratios compare cases measured in this one run:

- remat: the same batch with `model.remat_policy` none / dots / full (recomputation costs time, never
  model FLOPs; on accelerators it buys memory for bigger micro-batches, see benchmarks/aot_memory.py);
- packing: the same rows × seq_len with one sample per row (padded) or several (packed). Stage 1 at
  seq_len 128 (a demo caption sample is ~25 tokens, as a real one is ~90 of the 7B recipe's 512), the
  packed run with 4 image slots per row; stage 2 at the demo recipe's 96 tokens with 2 slots per row.
  "trained tok/s" counts loss-weighted tokens: the work that trains the model.

    PYTHONPATH=. JAX_PLATFORMS=cpu python benchmarks/train_step.py [--sizes tiny,100m] [--steps 8]
        [--warmup 3] [--parts remat,packing]

Needs the demo world (demo.sh, or `python -m data_pipelines.synthetic --out demo_world`).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

from owl_jax.config import load_config
from owl_jax.train import run

STAGE_CONFIGS = {"stage1": "configs/demo_stage1.yaml", "stage2": "configs/demo_stage2.yaml"}

# ~100M parameters: vision 6 × 384 (112 px, patch 14: 64 patches), abstractor 2 × 384, LLM 10 × 768.
SIZES = {
    "tiny": [],
    "100m": ["model.vision.hidden_size=384", "model.vision.intermediate_size=1536", "model.vision.num_layers=6",
             "model.vision.num_heads=6", "model.vision.image_size=112", "model.vision.patch_size=14",
             "model.abstractor.hidden_size=384", "model.abstractor.intermediate_size=1536",
             "model.abstractor.num_heads=6", "model.abstractor.num_queries=16",
             "model.text.hidden_size=768", "model.text.intermediate_size=2048", "model.text.num_layers=10",
             "model.text.num_heads=12", "data.global_batch_size=8", "data.images_per_batch=8"],
    # ~1.1B for accelerators (not run by default): ViT-L/14 at 224 px (300M), abstractor 1024 wide,
    # LLM 16 × 2048 (810M), bf16 compute. `--sizes 1b --parts remat,attention` on a GPU.
    "1b": ["model.vision.hidden_size=1024", "model.vision.intermediate_size=4096", "model.vision.num_layers=24",
           "model.vision.num_heads=16", "model.vision.image_size=224", "model.vision.patch_size=14",
           "model.abstractor.hidden_size=1024", "model.abstractor.intermediate_size=2816",
           "model.abstractor.num_heads=16", "model.abstractor.num_queries=64", "model.abstractor.num_layers=6",
           "model.text.hidden_size=2048", "model.text.intermediate_size=5504", "model.text.num_layers=16",
           "model.text.num_heads=16", "model.text.max_position_embeddings=2048", "model.dtype=bfloat16",
           "data.seq_len=512", "data.global_batch_size=16", "data.images_per_batch=16"],
}
COMMON = ["init.from_checkpoint=''", "training.log_every=1", "training.checkpoint_every=100000",
          "training.eval_every=0", "logging.progress=false", "logging.tensorboard=false"]


def measure(stage: str, overrides: list[str], steps: int, warmup: int, out: str, name: str) -> dict:
    run_dir = os.path.join(out, name)
    cfg = load_config(STAGE_CONFIGS[stage], COMMON + overrides + [f"training.steps={steps}",
                                                                  f"training.output_dir={run_dir}"])
    run(cfg)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if '"seconds_per_step"' in line]
    timed = [r for r in rows if r["step"] > warmup]
    seconds = sum(r["seconds_per_step"] for r in timed)
    n = len(timed)
    result = {"seconds_per_step": seconds / n, "trained_tokens_per_s": sum(r["tokens"] for r in timed) / seconds,
              "model_tflops_per_s": sum(r["model_tflops_per_s"] * r["seconds_per_step"] for r in timed) / seconds,
              "trained_tokens_per_step": sum(r["tokens"] for r in timed) / n,
              "positions_per_step": cfg.data.global_batch_size * cfg.data.seq_len}
    if all("mfu" in r for r in timed):
        result["mfu"] = sum(r["mfu"] * r["seconds_per_step"] for r in timed) / seconds
    # image slots computed per second (the vision tower's work; unused slots are zeros but still computed)
    result["images_per_s"] = sum(r["images_per_s"] * r["seconds_per_step"] for r in timed) / seconds
    return result


def parameter_count(size: str) -> int:
    import jax
    import numpy as np
    from flax import nnx

    from owl_jax.models.owl import build_model
    cfg = load_config(STAGE_CONFIGS["stage1"], COMMON + SIZES[size])
    abstract = nnx.eval_shape(lambda: build_model(cfg.model))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def _row(label: str, r: dict, baseline: dict | None, key: str) -> str:
    mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "n/a"
    ratio = f"{r[key] / baseline[key]:.2f}" if baseline else "1.00"
    return (f"| {label} | {r['seconds_per_step']:.3f} | {r['trained_tokens_per_s']:.0f} | {r['images_per_s']:.1f} | "
            f"{r['model_tflops_per_s']:.3f} | {mfu} | {ratio} |")


HEADER = ("| case | s/step | trained tok/s | images/s | model TFLOP/s | MFU | {ratio} |\n"
          "| --- | --- | --- | --- | --- | --- | --- |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="tiny,100m")
    p.add_argument("--parts", default="remat,packing", help="remat, packing, attention (GPU)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    a = p.parse_args(argv)
    sizes, parts = a.sizes.split(","), a.parts.split(",")
    for size in sizes:
        print(f"{size}: {parameter_count(size) / 1e6:.1f}M parameters")
    with tempfile.TemporaryDirectory() as out:
        if "remat" in parts:
            print("\nremat policies (ratio: step time vs none)\n" + HEADER.format(ratio="s/step vs none"))
            for size in sizes:
                for stage in ("stage1", "stage2"):
                    base = None
                    for policy in ("none", "dots", "full"):
                        r = measure(stage, SIZES[size] + [f"model.remat_policy={policy}"], a.steps, a.warmup, out,
                                    f"{size}-{stage}-remat-{policy}")
                        print(_row(f"{size} {stage} remat={policy}", r, base, "seconds_per_step"), flush=True)
                        base = base or r
        if "attention" in parts:  # GPU: cuDNN flash attention through jax.nn.dot_product_attention
            print("\nattention implementation (ratio: step time vs xla)\n" + HEADER.format(ratio="s/step vs xla"))
            for size in sizes:
                for stage in ("stage1", "stage2"):
                    base = None
                    for impl in ("xla", "cudnn"):
                        r = measure(stage, SIZES[size] + [f"model.attention_impl={impl}"], a.steps, a.warmup, out,
                                    f"{size}-{stage}-attention-{impl}")
                        print(_row(f"{size} {stage} attention={impl}", r, base, "seconds_per_step"), flush=True)
                        base = base or r
        if "packing" in parts:
            print("\npadded vs packed (ratio: trained tokens/s vs padded)\n"
                  + HEADER.format(ratio="trained tok/s vs padded"))
            for size in sizes:
                rows = 8 if size == "100m" else 16
                cases = {"stage1": (["data.seq_len=128", f"data.global_batch_size={rows}"], 4),
                         "stage2": ([f"data.global_batch_size={rows}"], 2)}
                for stage, (shape, images_per_row) in cases.items():
                    padded = measure(stage, SIZES[size] + shape + ["data.packing=false",
                                                                   f"data.images_per_batch={rows}"],
                                     a.steps, a.warmup, out, f"{size}-{stage}-padded")
                    packed = measure(stage, SIZES[size] + shape + ["data.packing=true",
                                                                   f"data.images_per_batch={rows * images_per_row}"],
                                     a.steps, a.warmup, out, f"{size}-{stage}-packed")
                    print(_row(f"{size} {stage} padded", padded, None, "trained_tokens_per_s"))
                    print(_row(f"{size} {stage} packed ({images_per_row} images/row)", packed, padded,
                               "trained_tokens_per_s"), flush=True)


if __name__ == "__main__":
    main()
