"""Helpers shared by the conversion, parity and export tests: exact tensor comparison, random weights for
PyTorch and owl-jax models (so that no value sits at a trivial init that a wrong mapping would still
match), and error measures."""

from __future__ import annotations

import math

import numpy as np


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def assert_same_tensors(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    bad = [k for k in want if not same_bits(got[k], want[k])]
    assert not bad, f"tensors differ: {bad[:10]}"


def max_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def randomize_(model, seed: int) -> None:
    """Re-draw every parameter of a torch module (LayerNorm / RMSNorm scales around 1, small non-zero
    biases, CLS / positions / token embeddings ~ N(0, 0.25), Linear and conv weights ~ N(0, 1/fan_in))."""
    import torch

    g = torch.Generator().manual_seed(seed)

    def randn(shape):
        return torch.randn(shape, generator=g, dtype=torch.float32)

    with torch.no_grad():
        for name, p in model.named_parameters():  # tied parameters are listed once
            if name.endswith("bias"):
                p.copy_(0.1 * randn(p.shape))
            elif p.ndim == 1 and "norm" in name:  # LayerNorm / RMSNorm scales
                p.copy_(1.0 + 0.2 * randn(p.shape))
            elif p.ndim == 1 or "embedding" in name or "embed_tokens" in name:  # CLS, positions, tokens
                p.copy_(0.5 * randn(p.shape))
            else:  # Linear (out, in) and the patch conv (D, C, p, p)
                p.copy_(randn(p.shape) / math.sqrt(math.prod(p.shape[1:])))


def random_canonical_params(shapes: dict, seed: int) -> dict[str, np.ndarray]:
    """Random values for owl-jax canonical parameters (`convert.state.canonical_shapes`), drawn by the same
    scheme as `randomize_`: norm scales around 1, biases small, kernels ~ N(0, 1/fan_in), LoRA B non-zero."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, (shape, _) in sorted(shapes.items()):
        leaf = name.rsplit(".", 1)[-1]
        x = rng.normal(size=shape)
        if leaf == "scale":
            x = 1.0 + 0.2 * x
        elif leaf == "bias":
            x = 0.1 * x
        elif leaf in ("kernel", "lora_a", "lora_b") or name.endswith("patch_embed"):
            x = x / math.sqrt(math.prod(shape[:-1]))
        else:  # embeddings, CLS, positions, queries, vit_eos
            x = 0.5 * x
        out[name] = x.astype(np.float32)
    return out


def random_model(cfg, seed: int):
    """An owl-jax model of the ModelConfig `cfg` with every parameter drawn by `random_canonical_params`
    (no parameter left at an init value a wrong conversion could still reproduce)."""
    from owl_jax.convert.state import assign_canonical_params, canonical_shapes
    from owl_jax.models.owl import build_model
    model = build_model(cfg)
    assign_canonical_params(model, random_canonical_params(canonical_shapes(model), seed))
    return model


def image_train_batch(cfg, rows=4, seq=48, images=(1, 2, 0, 1), budget=4, seed=0) -> dict:
    """A host train batch for any connector: random tokens with `images[r]` image slots in row r (spliced
    as the pipelines place them), a next-token loss on the text, random pixels; with an InstructBLIP
    Q-Former, random instruction tokens per image slot (padded with -1)."""
    from owl_jax.models.splice import plan_image_slots
    rng = np.random.default_rng(seed)
    tpi = cfg.model.tokens_per_image
    ids = rng.integers(3, cfg.model.text.vocab_size, size=(rows, seq))
    for r, n in enumerate(images):
        for j in range(n):
            ids[r, 1 + j * (tpi + 1):1 + j * (tpi + 1) + tpi] = -1
    index = plan_image_slots(ids, np.array(images), tokens_per_image=tpi, image_budget=budget)
    size = cfg.model.vision.image_size
    mask = (ids >= 0) & (np.roll(ids, -1, axis=1) >= 0)
    mask[:, -1] = False
    batch = dict(tokens=ids.astype(np.int32), targets=np.roll(ids, -1, axis=1).clip(0).astype(np.int32),
                 loss_mask=mask, positions=np.broadcast_to(np.arange(seq, dtype=np.int32), ids.shape).copy(),
                 segment_ids=np.ones_like(ids, dtype=np.int32), image_index=index,
                 pixel_values=rng.normal(size=(budget, size, size, 3)).astype(np.float32))
    if cfg.model.connector == "qformer" and cfg.model.qformer.text_input:
        length = cfg.model.qformer.max_text_len
        text = rng.integers(0, cfg.model.qformer.vocab_size, size=(budget, length)).astype(np.int32)
        text[np.arange(length)[None] >= rng.integers(1, length, size=(budget, 1))] = -1
        batch["qformer_tokens"] = text
    return batch


def cli_env(devices: int | None = None) -> dict:
    """The environment for running an owl-jax CLI in a subprocess from the tests: the checkout on PYTHONPATH,
    and optionally fewer fake CPU devices than the suite's 8 (a smaller program to compile)."""
    import os
    import re
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    e = dict(os.environ)
    e["PYTHONPATH"] = root + os.pathsep + e.get("PYTHONPATH", "")
    if devices is not None:
        flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", e.get("XLA_FLAGS", ""))
        e["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    return e


#: Flat-colour test pictures (56 px, noisy) whose colour a tiny model learns in a few steps.
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


def colour_picture(name: str, rng):
    """A 56 x 56 picture of colour `name` with Gaussian noise (a PIL image)."""
    from PIL import Image
    return Image.fromarray(np.clip(np.array(COLOURS[name]) + rng.normal(0, 20, (56, 56, 3)), 0, 255).astype(np.uint8))


def write_colour_data(root, count: int = 16, seed: int = 0):
    """Training data for the tiny train-CLI runs under `root`: `count` pictures cycling through COLOURS as
    caption shards (`c-000.tar`, ..., 8 samples each, "a {colour} picture") and as LLaVA-format chat
    (`images/{i}.png` + `chat.json`: "What colour is it?" -> the colour). Returns (the shards' brace pattern,
    chat.json, the image folder)."""
    import json
    from pathlib import Path
    from data_pipelines.writer import write_caption_shards
    root = Path(root)
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    write_caption_shards(((f"{i:05d}", colour_picture(names[i % 3], rng), f"a {names[i % 3]} picture")
                          for i in range(count)), str(root / "c-%03d.tar"), 8)
    (root / "images").mkdir(exist_ok=True)
    records = []
    for i in range(count):
        colour_picture(names[i % 3], rng).save(root / "images" / f"{i}.png")
        records.append({"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": names[i % 3]}]})
    (root / "chat.json").write_text(json.dumps(records))
    shards = (count + 7) // 8
    return f"{root}/c-{{000..{shards - 1:03d}}}.tar", root / "chat.json", root / "images"
