"""Effective trained tokens/s with and without sequence packing, on the demo recipes, in one run.

Packing puts several conversations in one row (segment ids, restarting positions), so a step of the
same shape trains on more answer tokens; its cost is the packing itself and nothing in the model (the
per-sample loss equality is tested in tests/test_packing.py). This script trains each recipe twice for
`--steps` steps from the same start — `data.packing=false` and `=true` — with one log line per step, and
compares trained (loss-weighted) tokens per second of wall time after `--warmup` steps (compile
excluded), plus samples per step.

    PYTHONPATH=. JAX_PLATFORMS=cpu python benchmarks/packing.py [--steps 40] [--warmup 5]
        [--recipe configs/demo_lm.yaml] [--recipe configs/demo_stage2.yaml=init.from_checkpoint=RUN]

Needs the demo world (`python -m data_pipelines.synthetic --out demo_world ...`, see demo.sh) and, for
stage 2, a stage-1 run to start from.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

from owl_jax.config import load_config
from owl_jax.train import run


def measure(config: str, overrides: list[str], packing: bool, steps: int, warmup: int, out: str) -> dict:
    run_dir = os.path.join(out, f"{os.path.basename(config)}-packing-{packing}")
    cfg = load_config(config, overrides + [f"data.packing={str(packing).lower()}", f"training.steps={steps}",
                                           "training.log_every=1", "training.checkpoint_every=100000",
                                           "training.eval_every=0", "logging.progress=false",
                                           "logging.tensorboard=false", f"training.output_dir={run_dir}"])
    run(cfg)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if '"tokens_per_s"' in line]
    timed = [r for r in rows if r["step"] > warmup]
    tokens = sum(r["tokens"] for r in timed)
    seconds = sum(r["tokens"] / r["tokens_per_s"] for r in timed if r["tokens_per_s"] > 0)
    return {"tokens_per_step": tokens / len(timed), "tokens_per_s": tokens / seconds,
            "seconds_per_step": seconds / len(timed)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", action="append", default=None,
                   help="CONFIG[=override=...]: a recipe and its overrides (repeatable)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    a = p.parse_args()
    recipes = a.recipe or ["configs/demo_lm.yaml"]
    with tempfile.TemporaryDirectory() as out:
        print(f"{'recipe':28} {'packing':>8} {'trained tok/step':>17} {'s/step':>8} {'trained tok/s':>14}")
        for recipe in recipes:
            config, *overrides = recipe.split("=", 1)
            overrides = overrides[0].split(",") if overrides else []
            results = {packing: measure(config, overrides, packing, a.steps, a.warmup, out)
                       for packing in (False, True)}
            for packing, r in results.items():
                print(f"{os.path.basename(config):28} {str(packing):>8} {r['tokens_per_step']:17.1f} "
                      f"{r['seconds_per_step']:8.3f} {r['tokens_per_s']:14.1f}")
            print(f"{os.path.basename(config):28} packed / padded trained tokens/s: "
                  f"{results[True]['tokens_per_s'] / results[False]['tokens_per_s']:.2f}x")


if __name__ == "__main__":
    main()
