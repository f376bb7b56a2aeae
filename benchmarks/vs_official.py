"""owl-jax's train step against the official PyTorch mPLUG-Owl on identical work, interleaved in one run.

Both sides train the same function: the same config (the official schema, as owl-jax exports it), the same
float32 weights (a random owl-jax model exported in the official layout and loaded by both), the same batch
(one image per row, full rows, a loss mask over the caption part), dropout off, AdamW (lr 1e-4, no weight
decay, grad clip 1.0). Stage 1: the LLM frozen, vision tower + abstractor + queries trained. Stage 2: LoRA on
`q_proj`, `v_proj` (r 8, α 32), everything else frozen — peft on the official side, as its
`pipeline/train.py --use-lora` does it.

The official step runs in its own virtual environment (`--python`, torch at `--threads` threads) as a
subprocess (`benchmarks/_official_driver.py`, which imports nothing of owl-jax); weights and the batch go to it
as safetensors / npz files, timings come back as JSON lines. Blocks of `--steps` steps alternate between the
two so that machine noise hits both; the first block of each side is warm-up (compile, allocator), the
medians are over the others. The losses of the first steps are printed side by side: they must agree to
float32 tolerance (step 0 is the forward of identical weights; later steps follow identical updates).

    PYTHONPATH=. JAX_PLATFORMS=cpu python benchmarks/vs_official.py --official /tmp/official/mPLUG-Owl \
        [--python /work/official-venv/bin/python] [--sizes tiny,small,100m] [--stages 1,2] [--steps 8]
        [--blocks 4] [--threads 2] [--json results.jsonl]

`--official` is the `mPLUG-Owl/` folder of a checkout of github.com/X-PLUG/mPLUG-Owl (the v1 code).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

DRIVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_official_driver.py")

# Model / batch overrides of configs/tiny_test.yaml per size (float32 throughout, from the tiny config).
SIZES = {
    "tiny": [],  # the golden sizes: ViT 64×2 @56 px, abstractor 64×2 (8 queries), LLaMA 96×2 vocab 512
    "small": ["model.vision.hidden_size=256", "model.vision.intermediate_size=1024", "model.vision.num_layers=4",
              "model.vision.num_heads=4", "model.vision.image_size=112", "model.abstractor.hidden_size=256",
              "model.abstractor.intermediate_size=704", "model.abstractor.num_layers=2",
              "model.abstractor.num_heads=4", "model.abstractor.num_queries=16", "model.text.vocab_size=8000",
              "model.text.hidden_size=512", "model.text.intermediate_size=1408", "model.text.num_layers=4",
              "model.text.num_heads=8", "model.text.max_position_embeddings=512",
              "model.loss_chunk_size=1024", "data.seq_len=256", "data.global_batch_size=4",
              "data.images_per_batch=4"],
    # ~100M parameters (vision 6×384, abstractor 2×384, LLM 10×768 vocab 8000): benchmarks/train_step.py's
    # 100m with a real vocabulary, 2 rows of 256 tokens.
    "100m": ["model.vision.hidden_size=384", "model.vision.intermediate_size=1536", "model.vision.num_layers=6",
             "model.vision.num_heads=6", "model.vision.image_size=112", "model.abstractor.hidden_size=384",
             "model.abstractor.intermediate_size=1536", "model.abstractor.num_heads=6",
             "model.abstractor.num_queries=16", "model.text.vocab_size=8000", "model.text.hidden_size=768",
             "model.text.intermediate_size=2048", "model.text.num_layers=10", "model.text.num_heads=12",
             "model.text.max_position_embeddings=512", "model.loss_chunk_size=1024", "data.seq_len=256",
             "data.global_batch_size=2", "data.images_per_batch=2"],
}
STAGES = {1: ["training.stage=owl_stage1"],
          2: ["training.stage=owl_stage2_lora", "model.lora.rank=8", "model.lora.alpha=32", "model.lora.dropout=0.0"]}
COMMON = ["model.abstractor.attention_dropout=0.0", "optimizer.schedule=constant", "optimizer.learning_rate=1e-4",
          "optimizer.warmup_steps=0", "optimizer.weight_decay=0.0", "optimizer.grad_clip_norm=1.0"]
LR = 1e-4


def make_batch(cfg, seed: int = 0) -> tuple[dict, dict]:
    """(owl-jax batch, official inputs) of one identical batch: per row BOS, one image's placeholders, then
    random text; the loss on the text after an 8-token prompt (the official `prompt_mask`)."""
    from owl_jax.models.splice import plan_image_slots

    b, t = cfg.data.global_batch_size, cfg.data.seq_len
    tpi = cfg.model.tokens_per_image
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, cfg.model.text.vocab_size, size=(b, t)).astype(np.int64)
    tokens[:, 0] = 1
    tokens[:, 1:1 + tpi] = -1
    size = cfg.model.vision.image_size
    pixels = rng.normal(size=(b, size, size, 3)).astype(np.float32)
    mask = np.zeros((b, t), bool)  # mask[j]: the target tokens[j + 1] is trained
    mask[:, 1 + tpi + 8:t - 1] = True
    targets = np.concatenate([np.maximum(tokens[:, 1:], 0), np.zeros((b, 1), np.int64)], axis=1)
    ours = {"tokens": tokens.astype(np.int32), "targets": targets.astype(np.int32), "loss_mask": mask,
            "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
            "segment_ids": np.ones((b, t), np.int32), "pixel_values": pixels,
            "image_index": plan_image_slots(tokens, np.ones(b), tokens_per_image=tpi, image_budget=b)}
    official = {"pixel_values": np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)), "input_ids": tokens,
                "num_images": np.ones(b, np.int64), "non_padding_mask": np.ones((b, t - 1), np.int64),
                "non_media_mask": (tokens[:, 1:] >= 0).astype(np.int64),
                "prompt_mask": mask[:, :-1].astype(np.int64), "attention_mask": np.ones((b, t), np.int64)}
    return ours, official


def write_weights(trainer, cfg, out: str) -> str | None:
    """The trainer's initial weights in the official layout (float32) under `out`; the PEFT adapter
    tensors too when the model has LoRA. Returns the adapter path or None."""
    from owl_jax.convert import io
    from owl_jax.export import export_files

    model = trainer.model()
    tensors, configs = export_files(model, cfg.model, "mplug-owl", dtype="float32")
    io.save_safetensors(tensors, os.path.join(out, "model.safetensors"), {"format": "pt"})
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(configs["config.json"], f)
    if cfg.model.lora.rank == 0:
        return None
    adapter, _ = export_files(model, cfg.model, "peft-lora", dtype="float32")
    path = os.path.join(out, "adapter_model.safetensors")
    io.save_safetensors(adapter, path, {"format": "pt"})
    return path


class Official:
    """The official train step in a subprocess (JSON lines over its stdin / stdout)."""

    def __init__(self, python: str, spec: dict, workdir: str):
        spec_path = os.path.join(workdir, "spec.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
        env.update(OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]))
        self.proc = subprocess.Popen([python, DRIVER, spec_path], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env, cwd=workdir)
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the official driver exited (code {self.proc.wait()}); see its stderr above")
        return json.loads(line)

    def steps(self, n: int) -> list[dict]:
        self.proc.stdin.write(f"steps {n}\n")
        self.proc.stdin.flush()
        rows = []
        while "done" not in (row := self._read()):
            rows.append(row)
        return rows

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)


def owl_steps(trainer, batch, n: int) -> list[dict]:
    import jax

    rows = []
    for _ in range(n):
        t0 = time.perf_counter()
        metrics = trainer.step(batch)
        jax.block_until_ready((metrics, trainer.state))
        rows.append({"loss": float(metrics["loss"]), "seconds": time.perf_counter() - t0})
    return rows


def load_cfg(size: str, stage: int, extra: list[str] = ()):
    from owl_jax.config import load_config
    return load_config("configs/tiny_test.yaml", COMMON + SIZES[size] + STAGES[stage] + list(extra))


def compare(size: str, stage: int, a, extra: list[str] = ()) -> dict:
    """One size × stage: both steps interleaved; medians, ratio and the first losses."""
    import jax
    from flax import nnx

    from owl_jax.sharding import make_mesh
    from owl_jax.training.train_step import create_trainer

    cfg = load_cfg(size, stage, extra)
    ours, official_inputs = make_batch(cfg)
    mesh = make_mesh(cfg.mesh, devices=jax.devices()[:1])
    trainer = create_trainer(cfg, mesh, batch_example=ours)
    n_ours = sum(int(np.prod(v.shape)) for path, v in nnx.to_flat_state(nnx.state(trainer.model(), nnx.Param))
                 if ".".join(map(str, path)) in set(trainer.trainable))
    with tempfile.TemporaryDirectory() as work:
        adapter = write_weights(trainer, cfg, work)
        np.savez(os.path.join(work, "batch.npz"), **official_inputs)
        spec = {"official": os.path.abspath(a.official), "model_dir": work, "batch": os.path.join(work, "batch.npz"),
                "stage": stage, "threads": a.threads, "lr": LR, "weight_decay": 0.0,
                "lora": {"rank": cfg.model.lora.rank, "alpha": cfg.model.lora.alpha, "adapter": adapter}}
        official = Official(a.python, spec, work)
        batch = trainer.put_batch(ours)
        theirs, mine, loads = [], [], []
        try:
            for block in range(a.blocks):
                loads.append(open("/proc/loadavg").read().split()[0])
                theirs.append(official.steps(a.steps))
                mine.append(owl_steps(trainer, batch, a.steps))
        finally:
            official.close()
    med = lambda blocks: statistics.median(r["seconds"] for blk in blocks[1:] for r in blk)  # noqa: E731
    first = min(3, a.steps)
    result = {"size": size, "stage": stage, "official_s": med(theirs), "owl_jax_s": med(mine),
              "steps_timed": a.steps * (a.blocks - 1), "loadavg": loads,
              "trainable": {"official": official.info["trainable"], "owl_jax": n_ours},
              "losses": {"official": [r["loss"] for r in theirs[0][:first]],
                         "owl_jax": [r["loss"] for r in mine[0][:first]]}, "extra": list(extra)}
    result["ratio"] = result["owl_jax_s"] / result["official_s"]
    result["max_loss_diff"] = max(abs(x - y) for x, y in zip(*result["losses"].values()))
    return result


# ---------------------------------------------------------------------- part 3: the same data end to end

#: The end-to-end model: `small` with 2048 positions (the official recipes' `max_length`).
E2E_MODEL = SIZES["small"][:-5] + ["model.text.max_position_embeddings=2048", "model.loss_chunk_size=2048"]
E2E_DATA = {
    "captions": lambda w: ["data.kind=captions", f"data.train_paths=['{w['captions_train']}']",
                           "data.caption_template='Human: <image>\\nAI: {caption}'"],
    "instructions": lambda w: ["data.kind=instructions", "data.system_prompt=''",
                               f"data.sources=[{{name: vqa, path: '{w['vqa_train']}', format: llava, "
                               f"image_root: '{w['image_root']}'}}, {{name: alpaca, path: '{w['alpaca_train']}', "
                               f"format: alpaca}}]"],
}


def _samples(batch) -> int:
    """Samples in a batch: the distinct segments (> 0) of each row."""
    return int(sum(len(set(row[row > 0].tolist())) for row in np.asarray(batch["segment_ids"])))


def _official_padded(batch) -> dict:
    """The official model's inputs for rows that each hold one sample padded to the row length."""
    tokens = np.asarray(batch["tokens"]).astype(np.int64)
    real = np.asarray(batch["segment_ids"]) > 0
    ids = np.where(real, tokens, 0)
    b = len(tokens)
    return {"pixel_values": np.ascontiguousarray(np.asarray(batch["pixel_values"])[:b].transpose(0, 3, 1, 2)),
            "input_ids": ids, "num_images": (tokens < 0).any(axis=1).astype(np.int64),
            "non_padding_mask": real[:, 1:].astype(np.int64), "non_media_mask": (ids[:, 1:] >= 0).astype(np.int64),
            "prompt_mask": np.asarray(batch["loss_mask"])[:, :-1].astype(np.int64),
            "attention_mask": real.astype(np.int64)}


def end_to_end(kind: str, world: dict, a) -> dict:
    """Trained samples per second on the demo world's `kind` data, same model, one run: the official step on
    rows padded to `--max-length` (one sample each, `--official-rows` of them: its pipeline's layout), and
    owl-jax's step fed by its own input pipeline (decode, tokenise, pack: timed too) on `--owl-rows` packed
    rows of the same length. The official side is timed on one padded batch of real samples, its input
    pipeline not counted."""
    import jax

    from owl_jax.config import load_config
    from owl_jax.data import make_pipeline
    from owl_jax.sharding import make_mesh
    from owl_jax.training.train_step import create_trainer
    from data_pipelines.tokenizers import load_tokenizer

    common = COMMON + E2E_MODEL + STAGES[1 if kind == "captions" else 2] + E2E_DATA[kind](world) + [
        f"data.tokenizer={world['tokenizer']}", f"data.seq_len={a.max_length}", "data.num_workers=0",
        "data.augment=false", "data.hflip=false", "data.max_skip_fraction=0.5"]
    packed = load_config("configs/tiny_test.yaml", common + [
        "data.packing=true", f"data.global_batch_size={a.owl_rows}", f"data.images_per_batch={a.owl_images}"])
    padded = load_config("configs/tiny_test.yaml", common + [
        "data.packing=false", f"data.global_batch_size={a.official_rows}",
        f"data.images_per_batch={a.official_rows}"])
    tokenizer = load_tokenizer(world["tokenizer"])
    pipe = make_pipeline(padded, tokenizer)
    try:
        official_batch = next(iter(pipe))
    finally:
        pipe.close()
    mesh = make_mesh(packed.mesh, devices=jax.devices()[:1])
    pipeline = make_pipeline(packed, tokenizer)
    batches = iter(pipeline)
    first = next(batches)
    trainer = create_trainer(packed, mesh, batch_example=first)
    with tempfile.TemporaryDirectory() as work:
        adapter = write_weights(trainer, packed, work)
        np.savez(os.path.join(work, "batch.npz"), **_official_padded(official_batch))
        spec = {"official": os.path.abspath(a.official), "model_dir": work, "batch": os.path.join(work, "batch.npz"),
                "stage": 1 if kind == "captions" else 2, "threads": a.threads, "lr": LR, "weight_decay": 0.0,
                "lora": {"rank": packed.model.lora.rank, "alpha": packed.model.lora.alpha, "adapter": adapter}}
        official = Official(a.python, spec, work)
        ours, theirs = [], []
        try:
            trainer.step(trainer.put_batch(first))  # compile
            for block in range(a.blocks):
                theirs += official.steps(a.steps)[1 if block == 0 else 0:]
                for _ in range(a.steps):
                    t0 = time.perf_counter()
                    batch = next(batches)
                    metrics = trainer.step(trainer.put_batch(batch))
                    jax.block_until_ready((metrics, trainer.state))
                    ours.append((_samples(batch), time.perf_counter() - t0))
        finally:
            official.close()
            pipeline.close()
    official_rate = a.official_rows / statistics.median(r["seconds"] for r in theirs)
    owl_rate = sum(n for n, _ in ours) / sum(t for _, t in ours)
    return {"kind": kind, "max_length": a.max_length, "official_rows": a.official_rows,
            "official_samples_per_s": official_rate, "official_step_s": statistics.median(r["seconds"] for r in theirs),
            "owl_rows": a.owl_rows, "owl_samples_per_step": statistics.mean(n for n, _ in ours),
            "owl_samples_per_s": owl_rate, "owl_step_s": statistics.median(t for _, t in ours),
            "speedup": owl_rate / official_rate, "steps_timed": len(ours),
            "loadavg": open("/proc/loadavg").read().split()[0]}


def run_end_to_end(a) -> int:
    from data_pipelines.synthetic import make_world
    world = make_world(a.world, num_train_pictures=a.world_pictures, num_eval_pictures=8)
    print("| data | official (padded to max_length) | owl-jax (packed) | owl-jax / official |\n| --- | --- | --- | --- |",
          flush=True)
    for kind in a.end_to_end.split(","):
        if kind not in E2E_DATA:
            print(f"error: --end-to-end takes {', '.join(E2E_DATA)}", file=sys.stderr)
            return 2
        r = end_to_end(kind, world, a)
        print(f"| demo world {kind}, rows of {r['max_length']} | {r['official_rows']} samples / step, "
              f"{r['official_step_s']:.2f} s / step = {r['official_samples_per_s']:.2f} samples/s | "
              f"{r['owl_rows']} rows, {r['owl_samples_per_step']:.1f} samples / step, {r['owl_step_s']:.2f} s / step "
              f"(input pipeline included) = {r['owl_samples_per_s']:.2f} samples/s | **{r['speedup']:.1f}x** |",
              flush=True)
        if a.json:
            with open(a.json, "a") as f:
                f.write(json.dumps(r) + "\n")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--official", required=True, help="the mPLUG-Owl/ folder of an X-PLUG/mPLUG-Owl checkout")
    p.add_argument("--python", default="/work/official-venv/bin/python",
                   help="python of a venv with the official code's pins (torch, transformers 4.28.1, peft 0.3.0)")
    p.add_argument("--sizes", default="tiny,small,100m")
    p.add_argument("--stages", default="1,2")
    p.add_argument("--steps", type=int, default=8, help="steps per block")
    p.add_argument("--blocks", type=int, default=4, help="alternating blocks per side (the first is warm-up)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--set", action="append", default=[], help="extra owl-jax config override (repeatable)")
    p.add_argument("--json", default="", help="append one JSON line per result to this file")
    e = p.add_argument_group("end to end (part 3): trained samples/s on the same data, padding vs packing")
    e.add_argument("--end-to-end", default="", help="captions,instructions: run this comparison instead")
    e.add_argument("--world", default="/tmp/owl_vs_official_world", help="demo world folder (made if missing)")
    e.add_argument("--world-pictures", type=int, default=400)
    e.add_argument("--max-length", type=int, default=2048, help="the official recipes' max_length")
    e.add_argument("--official-rows", type=int, default=2, help="padded rows (samples) per official step")
    e.add_argument("--owl-rows", type=int, default=1, help="packed rows per owl-jax step")
    e.add_argument("--owl-images", type=int, default=64, help="image budget of an owl-jax step")
    a = p.parse_args(argv)
    if not os.path.isfile(os.path.join(a.official, "mplug_owl", "modeling_mplug_owl.py")):
        print(f"error: {a.official} has no mplug_owl/modeling_mplug_owl.py (give the mPLUG-Owl/ folder of a "
              f"checkout)", file=sys.stderr)
        return 2
    if not os.access(a.python, os.X_OK):
        print(f"error: --python {a.python} is not an executable", file=sys.stderr)
        return 2
    if a.blocks < 2 or a.steps < 1:
        print("error: need --blocks >= 2 (the first is warm-up) and --steps >= 1", file=sys.stderr)
        return 2
    if a.end_to_end:
        return run_end_to_end(a)
    sizes = a.sizes.split(",")
    bad = [s for s in sizes if s not in SIZES]
    if bad:
        print(f"error: unknown size {bad[0]!r}; choose from {', '.join(SIZES)}", file=sys.stderr)
        return 2
    print("| config | stage | official PyTorch | owl-jax | owl-jax / official | losses (official / owl-jax), "
          "first steps | load avg |\n| --- | --- | --- | --- | --- | --- | --- |", flush=True)
    for size in sizes:
        for stage in map(int, a.stages.split(",")):
            r = compare(size, stage, a, a.set)
            losses = "; ".join(f"{x:.6f} / {y:.6f}" for x, y in zip(*r["losses"].values()))
            print(f"| {size} | {stage} | {1e3 * r['official_s']:.1f} ms | {1e3 * r['owl_jax_s']:.1f} ms | "
                  f"{r['ratio']:.2f} | {losses} (max diff {r['max_loss_diff']:.1e}) | {' '.join(r['loadavg'])} |",
                  flush=True)
            if r["trainable"]["official"] != r["trainable"]["owl_jax"]:
                print(f"  note: trainable parameters differ: {r['trainable']}", flush=True)
            if a.json:
                with open(a.json, "a") as f:
                    f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
