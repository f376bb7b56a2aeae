"""Input pipelines from the config, and the hand-off of per-process batches to global device arrays."""

from __future__ import annotations

import functools
from typing import Iterator, Mapping

import jax
import numpy as np
from jax.sharding import Mesh

from owl_jax.config import Config, ConfigError
from owl_jax.sharding import batch_shardings


def per_process(total: int, what: str) -> int:
    n = jax.process_count()
    if total % n:
        raise ConfigError(f"{what}={total} is not divisible by the {n} processes")
    return total // n


def make_pipeline(cfg: Config, tokenizer, *, split: str = "train", state: dict | None = None,
                  epochs: int | None = None):
    """The pipeline for `cfg.data.kind` (captions | instructions | text) and the split (train | eval)."""
    from data_pipelines.captions import CaptionPipeline
    data, model = cfg.data, cfg.model
    train = split == "train"
    common = dict(tokenizer=tokenizer, seq_len=data.seq_len, rows=per_process(data.global_batch_size,
                                                                               "data.global_batch_size"),
                  image_size=model.vision.image_size, tokens_per_image=model.tokens_per_image,
                  seed=data.seed if train else data.seed + 1, process_index=jax.process_index(),
                  num_processes=jax.process_count(), micro_batches=cfg.training.grad_accum_steps if train else 1,
                  max_skip_fraction=data.max_skip_fraction, max_pixels=data.max_pixels, state=state, epochs=epochs)
    budget = max(per_process(data.images_per_batch, "data.images_per_batch"), 1)
    if data.kind == "captions":
        paths = data.train_paths if train else data.eval_paths
        if not paths:
            raise ConfigError(f"data.{'train' if train else 'eval'}_paths is empty (caption shards expected)")
        return CaptionPipeline(paths, image_budget=budget, template=data.caption_template, shuffle=data.shuffle and train,
                               shuffle_shards=data.shuffle_shards, train=train and data.augment, hflip=data.hflip,
                               num_workers=data.num_workers if train else 0, prefetch=data.prefetch,
                               cache_dir=data.cache_dir or None, packing=data.packing, **common)
    if data.kind in ("instructions", "text"):
        from data_pipelines.instructions import InstructionPipeline, InstructionSource
        sources = data.sources if train else data.eval_sources
        if not sources:
            raise ConfigError(f"data.{'sources' if train else 'eval_sources'} is empty (instruction sources expected)")
        srcs = [InstructionSource(s.name or s.path, s.path, s.format, weight=s.weight or None, image_root=s.image_root)
                for s in sources]
        return InstructionPipeline(srcs, image_budget=budget, train=train and data.augment, hflip=data.hflip,
                                   packing=data.packing, system_prompt=data.system_prompt, template=data.template,
                                   **_qformer_text(cfg), **common)
    from owl_jax.config import DataConfig, field_choices  # (validated at load; a hand-built Config may skip that)
    raise ConfigError(f"data.kind {data.kind!r} is not one of {', '.join(field_choices(DataConfig, 'kind'))}")


def reads_instructions(cfg: Config) -> bool:
    """InstructBLIP: the model's Q-Former reads each image's instruction (the batch's `qformer_tokens`)."""
    return cfg.model.connector == "qformer" and cfg.model.qformer.text_input


def qformer_tokenizer_for(cfg: Config):
    """The Q-Former's WordPiece tokenizer of `data.qformer_tokenizer` (truncating at
    `model.qformer.max_text_len`) when the model `reads_instructions`, else None; ConfigError (one line) if
    it is unset, unreadable or larger than the Q-Former's vocabulary. Loaded once per (path, length):
    evaluation and serving open a chat session per question."""
    if not reads_instructions(cfg):
        return None
    if not cfg.data.qformer_tokenizer:
        raise ConfigError("model.qformer.text_input reads the instruction: set data.qformer_tokenizer (the "
                          "Q-Former's BERT tokenizer.json / vocab.txt)")
    try:
        tok = _wordpiece(cfg.data.qformer_tokenizer, cfg.model.qformer.max_text_len)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"data.qformer_tokenizer: {e}") from None
    if tok.vocab_size > cfg.model.qformer.vocab_size:
        raise ConfigError(f"data.qformer_tokenizer has {tok.vocab_size} tokens, model.qformer.vocab_size "
                          f"{cfg.model.qformer.vocab_size}")
    return tok


@functools.lru_cache(maxsize=8)
def _wordpiece(path: str, max_len: int):
    from data_pipelines.tokenizers import WordPieceTokenizer
    return WordPieceTokenizer(path, max_len)


def _qformer_text(cfg: Config) -> dict:
    """The instruction pipeline's Q-Former tokenizer arguments (none unless `reads_instructions`)."""
    tok = qformer_tokenizer_for(cfg)
    return {} if tok is None else {"qformer_tokenizer": tok, "qformer_text_len": cfg.model.qformer.max_text_len}


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows (a contiguous block of the global batch) -> global sharded arrays."""
    shapes = {k: jax.ShapeDtypeStruct((v.shape[0] * jax.process_count(),) + v.shape[1:], v.dtype)
              for k, v in local.items()}
    shardings = batch_shardings(shapes, mesh)
    return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v)) for k, v in local.items()}


def batches(pipeline, mesh: Mesh, keys: tuple[str, ...] | None = None) -> Iterator[dict[str, jax.Array]]:
    for local in pipeline:
        if keys is not None:
            local = {k: v for k, v in local.items() if k in keys}
        yield global_batch(local, mesh)


def batch_keys(cfg: Config) -> tuple[str, ...]:
    from owl_jax.training.stages import uses_images
    keys = ("tokens", "targets", "loss_mask", "positions", "segment_ids")
    if not uses_images(cfg.training.stage):
        return keys
    keys += ("pixel_values", "image_index")
    return keys + (("qformer_tokens",) if reads_instructions(cfg) and cfg.data.kind == "instructions" else ())

