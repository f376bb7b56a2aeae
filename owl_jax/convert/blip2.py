"""BLIP-2 family weights: transformers `Blip2ForConditionalGeneration` and `InstructBlipForConditionalGeneration`
(import, export, `config.json` both ways) and a MiniGPT-4 stage checkpoint (DESIGN.md §6).

| checkpoint keys | owl-jax paths |
| --- | --- |
| `vision_model.embeddings.{class_embedding, patch_embedding.{weight,bias}, position_embedding}` | `vision_model.{cls_token, patch_embed, patch_bias, position_embedding}` |
| `vision_model.encoder.layers.i.{layer_norm1, self_attn.{qkv, projection}, layer_norm2, mlp.fc1, mlp.fc2}` | `vision_model.layers.layers.i.{input_layernorm, self_attn.{qkv, q_bias, v_bias, projection}, post_attention_layernorm, mlp.*}` |
| `vision_model.post_layernorm` | `vision_model.post_layernorm` |
| `query_tokens` [1, Q, D] | `qformer.query_tokens` [Q, D] |
| `qformer.layernorm` (BLIP-2) / `qformer.embeddings.layernorm` (InstructBLIP) | `qformer.layernorm` |
| `qformer.embeddings.{word,position}_embeddings` (InstructBLIP) | `qformer.{word,position}_embeddings` |
| `qformer.encoder.layer.l.{attention, crossattention}.{attention.{query,key,value}, output.{dense, LayerNorm}}` | `qformer.layers.layers.b.layer_j.{attention, crossattention}.{query, key, value, output, norm}` (l = b·f + j) |
| `qformer.encoder.layer.l.{intermediate_query, output_query}` / `{intermediate, output}` (text) | `...layer_j.query_ffn` / `text_ffn` `.{intermediate, output, norm}` |
| `language_projection` | `qformer.language_projection` |
| `language_model.{model.*, lm_head}` | `language_model.*` (LLaMA only) |

transformers stores BLIP-2's attention bias as one `qkv.bias` of 3·D whose middle (k) third is zero; owl-jax
keeps `q_bias` and `v_bias`. On import the k third is dropped whatever it holds (a k bias adds the same
q·b_k to every score of a query, which softmax removes: the outputs do not depend on it; transformers keeps
it a trainable parameter whose gradient is zero but Adam's normalisation can still nudge it); export writes
zeros there, so import(export(x)) == x. Older checkpoints with separate `self_attn.q_bias` / `v_bias` keys
(LAVIS' names) are read too.

A checkpoint whose language model is not LLaMA (BLIP-2's OPT and Flan-T5 releases) gives the tower, the
queries and the Q-Former only: its `language_projection` was trained for that other LLM. That is how
MiniGPT-4 is assembled: the ViT and Q-Former of BLIP-2 (`init.blip2_from`), Vicuna (`init.llm_from`) and
its own projection, `llama_proj` in its `.pth` stage checkpoints (`init.minigpt4_from`, `load_minigpt4`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
from flax import nnx

from owl_jax.config import ModelConfig, QFormerConfig, VisionConfig
from owl_jax.convert import io
from owl_jax.convert.clip import _conv_to_jax, _conv_to_torch
from owl_jax.convert.keymap import (CheckpointMismatchError, TensorRule, layer_norm, linear, params_to_tensors,
                                    prefixed, reshape_to)
from owl_jax.convert.llama import IGNORED_BUFFERS, llama_rules
from owl_jax.convert.sources import TensorSource, open_source
from owl_jax.convert.state import canonical_params
from owl_jax.convert.stream import stream_params

LAYOUTS = ("blip2-hf", "instructblip-hf")
TOWER, QF = "vision_model", "qformer"
_MODEL_TYPES = {"blip-2": "blip2-hf", "instructblip": "instructblip-hf"}
_ARCHITECTURES = {"blip2-hf": "Blip2ForConditionalGeneration", "instructblip-hf": "InstructBlipForConditionalGeneration"}
_SUB_TYPES = {"blip2-hf": ("blip-2", "blip_2_vision_model", "blip_2_qformer"),
              "instructblip-hf": ("instructblip", "instructblip_vision_model", "instructblip_qformer")}
_IGNORED = IGNORED_BUFFERS + ("embeddings.position_ids",)


def layout_of(cfg: ModelConfig) -> str:
    """The transformers layout of a Q-Former model: InstructBLIP's when its Q-Former reads text."""
    return "instructblip-hf" if cfg.qformer.text_input else "blip2-hf"


# ------------------------------------------------------------------------------------------------
# Rules
# ------------------------------------------------------------------------------------------------


def vision_rules(cfg: VisionConfig) -> list[TensorRule]:
    """`Blip2VisionModel` keys (without `vision_model.`; `q_bias` / `v_bias` as `Blip2BiasView` shows them)."""
    d, p = cfg.hidden_size, cfg.num_positions
    rules = [
        TensorRule("embeddings.class_embedding", f"{TOWER}.cls_token", reshape_to((d,)), reshape_to((1, 1, d))),
        TensorRule("embeddings.patch_embedding.weight", f"{TOWER}.patch_embed", _conv_to_jax, _conv_to_torch),
        TensorRule("embeddings.patch_embedding.bias", f"{TOWER}.patch_bias"),
        TensorRule("embeddings.position_embedding", f"{TOWER}.position_embedding", reshape_to((p, d)),
                   reshape_to((1, p, d))),
        *layer_norm("post_layernorm", f"{TOWER}.post_layernorm"),
    ]
    for i in range(cfg.num_layers):
        k, s = f"encoder.layers.{i}", f"{TOWER}.layers.layers.{i}"
        rules += [*layer_norm(f"{k}.layer_norm1", f"{s}.input_layernorm"),
                  *linear(f"{k}.self_attn.qkv", f"{s}.self_attn.qkv", bias=False),
                  TensorRule(f"{k}.self_attn.q_bias", f"{s}.self_attn.q_bias"),
                  TensorRule(f"{k}.self_attn.v_bias", f"{s}.self_attn.v_bias"),
                  *linear(f"{k}.self_attn.projection", f"{s}.self_attn.projection", bias=True),
                  *layer_norm(f"{k}.layer_norm2", f"{s}.post_attention_layernorm"),
                  *linear(f"{k}.mlp.fc1", f"{s}.mlp.fc1", bias=True),
                  *linear(f"{k}.mlp.fc2", f"{s}.mlp.fc2", bias=True)]
    return rules


def _bert_attention(key: str, path: str) -> list[TensorRule]:
    return [*linear(f"{key}.attention.query", f"{path}.query", bias=True),
            *linear(f"{key}.attention.key", f"{path}.key", bias=True),
            *linear(f"{key}.attention.value", f"{path}.value", bias=True),
            *linear(f"{key}.output.dense", f"{path}.output", bias=True),
            *layer_norm(f"{key}.output.LayerNorm", f"{path}.norm")]


def _bert_ffn(intermediate: str, output: str, path: str) -> list[TensorRule]:
    return [*linear(f"{intermediate}.dense", f"{path}.intermediate", bias=True),
            *linear(f"{output}.dense", f"{path}.output", bias=True),
            *layer_norm(f"{output}.LayerNorm", f"{path}.norm")]


def qformer_rules(cfg: ModelConfig, *, projection: bool = True) -> list[TensorRule]:
    """`query_tokens`, `qformer.*` (BLIP-2 or InstructBLIP names, as `qformer.text_input` says) and
    `language_projection.*` <-> `qformer.*` paths."""
    c = cfg.qformer
    q, d = c.num_queries, c.hidden_size
    rules = [TensorRule("query_tokens", f"{QF}.query_tokens", reshape_to((q, d)), reshape_to((1, q, d)))]
    if c.text_input:
        rules += [TensorRule("qformer.embeddings.word_embeddings.weight", f"{QF}.word_embeddings"),
                  TensorRule("qformer.embeddings.position_embeddings.weight", f"{QF}.position_embeddings"),
                  *layer_norm("qformer.embeddings.layernorm", f"{QF}.layernorm")]
    else:
        rules += layer_norm("qformer.layernorm", f"{QF}.layernorm")
    f = c.cross_attention_frequency
    for layer in range(c.num_layers):
        k, s = f"qformer.encoder.layer.{layer}", f"{QF}.layers.layers.{layer // f}.layer_{layer % f}"
        rules += _bert_attention(f"{k}.attention", f"{s}.attention")
        if layer % f == 0:
            rules += _bert_attention(f"{k}.crossattention", f"{s}.crossattention")
        rules += _bert_ffn(f"{k}.intermediate_query", f"{k}.output_query", f"{s}.query_ffn")
        if c.text_input:
            rules += _bert_ffn(f"{k}.intermediate", f"{k}.output", f"{s}.text_ffn")
    if projection:
        rules += linear("language_projection", f"{QF}.language_projection", bias=True)
    return rules


def blip2_rules(cfg: ModelConfig, *, llm: bool = True) -> list[TensorRule]:
    """Every checkpoint key <-> owl-jax path of a BLIP-2 / InstructBLIP model (without the LLM and its
    projection when `llm` is false)."""
    rules = [*prefixed(vision_rules(cfg.vision), key_prefix="vision_model."), *qformer_rules(cfg, projection=llm)]
    if llm:
        rules += prefixed(llama_rules(cfg.text), key_prefix="language_model.")
    return rules


# ------------------------------------------------------------------------------------------------
# Import
# ------------------------------------------------------------------------------------------------


class Blip2BiasView(TensorSource):
    """A checkpoint with each vision layer's `self_attn.qkv.bias` [3·D] seen as `self_attn.q_bias` and
    `self_attn.v_bias` [D] (its k third dropped: see the module docstring); other keys pass through. Reads
    nothing early; the LLM can be hidden (`hide`: a predicate on keys)."""

    def __init__(self, source: TensorSource, hide: Callable[[str], bool] = lambda key: False):
        self._source = source
        self.name = source.name
        self._map: dict[str, tuple[str, int | None]] = {}  # key -> (source key, third of qkv.bias or None)
        for key in source.keys():
            if hide(key):
                continue
            if key.startswith("vision_model.") and key.endswith(".self_attn.qkv.bias"):
                stem = key[:-len("qkv.bias")]
                self._map[stem + "q_bias"] = (key, 0)
                self._map[stem + "v_bias"] = (key, 2)
            else:
                self._map[key] = (key, None)

    def keys(self) -> list[str]:
        return list(self._map)

    def __contains__(self, key: str) -> bool:
        return key in self._map

    def shape(self, key: str) -> tuple[int, ...]:
        k, third = self._map[key]
        shape = tuple(self._source.shape(k))
        if third is None:
            return shape
        if len(shape) != 1 or shape[0] % 3:
            raise CheckpointMismatchError(f"{self.name}: {k} has shape {shape}, not [3 * hidden]")
        return (shape[0] // 3,)

    def dtype(self, key: str) -> np.dtype:
        return self._source.dtype(self._map[key][0])

    def read(self, key: str) -> np.ndarray:
        k, third = self._map[key]
        x = self._source.read(k)
        if third is None:
            return x
        d = x.shape[0] // 3
        return np.array(x[third * d:(third + 1) * d])


def _has_llama(keys: list[str]) -> bool:
    return "language_model.model.embed_tokens.weight" in keys


def _without_tied_head(source: TensorSource, cfg: ModelConfig) -> TensorSource:
    from owl_jax.convert.llava import _without_tied_head as drop
    return drop(source, cfg)


def load_blip2(model: nnx.Module, cfg: ModelConfig, path: str | os.PathLike,
               log: Callable[[str], None] = lambda s: None) -> str:
    """Stream a `Blip2ForConditionalGeneration` / `InstructBlipForConditionalGeneration` checkpoint (file or
    directory) into a Q-Former model; returns the layout. With a LLaMA language model everything is loaded;
    otherwise (OPT, Flan-T5) the tower, the queries and the Q-Former (see the module docstring). Keys and
    shapes are checked against the model from the headers before any parameter changes."""
    if cfg.connector != "qformer" or cfg.vision.kind != "blip2":
        raise CheckpointMismatchError(f"BLIP-2 weights need model.connector qformer and model.vision.kind blip2 "
                                      f"(got {cfg.connector!r}, {cfg.vision.kind!r})")
    raw = open_source(path)
    keys = raw.keys()
    if not any(k.startswith("qformer.") for k in keys):
        raise CheckpointMismatchError(f"{raw.name} is not a BLIP-2 / InstructBLIP checkpoint: no qformer.* keys "
                                      f"(first keys: {sorted(keys)[:5]})")
    llm = _has_llama(keys)
    if not llm:
        what = "Flan-T5" if any(k.startswith(("language_model.encoder.", "language_model.shared.")) for k in keys) \
            else "OPT" if any(k.startswith("language_model.model.decoder.") for k in keys) else "no"
        log(f"{raw.name}: {what} language model, not LLaMA: loading the vision tower, the queries and the "
            f"Q-Former only (not language_projection)")
    hide = (lambda k: False) if llm else (lambda k: k.startswith(("language_model.", "language_projection.")))
    source = _without_tied_head(Blip2BiasView(raw, hide), cfg) if llm else Blip2BiasView(raw, hide)
    include = (lambda p: ".lora." not in p) if llm else \
        (lambda p: p.startswith((f"{TOWER}.", f"{QF}.")) and not p.startswith(f"{QF}.language_projection.")
         and ".lora." not in p)
    stream_params(model, source, blip2_rules(cfg, llm=llm), ignore=_IGNORED, include=include)
    return layout_of(cfg)


def load_minigpt4(model: nnx.Module, cfg: ModelConfig, path: str | os.PathLike) -> int:
    """The projection of a MiniGPT-4 stage checkpoint (`torch.save({"model": {"llama_proj.weight": ...,
    "llama_proj.bias": ...}, "optimizer": ..., ...})`, read with `torch.load(weights_only=True)`) into
    `qformer.language_projection`; every other parameter is left as it is. Returns the tensors read."""
    if cfg.connector != "qformer":
        raise CheckpointMismatchError(f"a MiniGPT-4 checkpoint needs model.connector qformer, not {cfg.connector!r}")
    state = _minigpt4_state(Path(path))
    proj = {k: v for k, v in state.items() if k.startswith("llama_proj.")}
    if sorted(proj) != ["llama_proj.bias", "llama_proj.weight"]:
        raise CheckpointMismatchError(f"{path}: no llama_proj.weight / llama_proj.bias in its model dict "
                                      f"(keys: {sorted(state)[:6]})")
    from owl_jax.convert.sources import DictSource
    tensors = {k.replace("llama_proj.", "language_projection."): io.torch_to_numpy(v) for k, v in proj.items()}
    rules = linear("language_projection", f"{QF}.language_projection", bias=True)
    return stream_params(model, DictSource(tensors, str(path)), rules,
                         include=lambda p: p.startswith(f"{QF}.language_projection.") and ".lora." not in p)


def _minigpt4_state(path: Path) -> dict:
    try:
        import torch
    except ImportError:  # pragma: no cover - depends on the environment
        raise io.WeightFileError(f"{path}: reading a MiniGPT-4 .pth needs torch (pip install torch)") from None
    if not path.is_file():
        raise io.WeightFileError(f"{path}: no such file (a MiniGPT-4 stage checkpoint is one .pth file)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for bad or unsafe pickles
        raise io.WeightFileError(f"{path}: cannot load with torch.load(weights_only=True): {e}") from e
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise CheckpointMismatchError(f"{path}: not a MiniGPT-4 checkpoint (expected a dict with a 'model' dict)")
    return {k: v for k, v in state.items() if hasattr(v, "detach")}


# ------------------------------------------------------------------------------------------------
# Export
# ------------------------------------------------------------------------------------------------


def check_exportable(cfg: ModelConfig, layout: str) -> None:
    """What transformers' classes cannot express, as CheckpointMismatchError."""
    from owl_jax.models.connectors import vision_features
    if layout not in LAYOUTS:
        raise CheckpointMismatchError(f"unknown BLIP-2 layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if cfg.connector != "qformer":
        raise CheckpointMismatchError(f"model.connector is {cfg.connector!r}; the {layout} layout needs qformer")
    if cfg.vision.kind != "blip2":
        raise CheckpointMismatchError(f"model.vision.kind is {cfg.vision.kind!r}; transformers' BLIP-2 classes "
                                      f"hold a Blip2VisionModel (kind blip2)")
    if cfg.vision.num_channels != 3:
        raise CheckpointMismatchError("Blip2VisionModel takes 3 image channels")
    spec = vision_features(cfg)
    if spec.layers != (cfg.vision.num_layers,) or spec.drop_cls or not spec.post_layernorm:
        raise CheckpointMismatchError("the Q-Former reads the post-LayerNormed last vision layer with CLS in "
                                      "transformers; leave model.vision_feature_* at their defaults")
    want = layout_of(cfg)
    if layout != want:
        raise CheckpointMismatchError(f"model.qformer.text_input is {cfg.qformer.text_input}: export as {want} "
                                      f"(InstructBLIP's Q-Former reads the instruction, BLIP-2's does not)")


def export_blip2_hf(model: nnx.Module, cfg: ModelConfig, layout: str | None = None) -> dict[str, np.ndarray]:
    """Base weights (LoRA excluded: merge first) as `Blip2ForConditionalGeneration` /
    `InstructBlipForConditionalGeneration` tensors."""
    layout = layout or layout_of(cfg)
    check_exportable(cfg, layout)
    params = {k: np.asarray(v) for k, v in canonical_params(model).items() if ".lora." not in k}
    tensors = params_to_tensors(params, blip2_rules(cfg))
    for key in [k for k in tensors if k.endswith(".self_attn.q_bias")]:
        stem = key[:-len("q_bias")]
        q, v = tensors.pop(key), tensors.pop(stem + "v_bias")
        tensors[stem + "qkv.bias"] = np.concatenate([q, np.zeros_like(q), v])
    return tensors


def image_token_index(cfg: ModelConfig) -> int:
    return cfg.image_token_index if cfg.image_token_index >= 0 else cfg.text.vocab_size - 1


def vision_config_json(v: VisionConfig, model_type: str) -> dict:
    return {"model_type": model_type, "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
            "num_hidden_layers": v.num_layers, "num_attention_heads": v.num_heads, "image_size": v.image_size,
            "patch_size": v.patch_size, "hidden_act": v.hidden_act, "layer_norm_eps": v.layer_norm_eps,
            "qkv_bias": True, "attention_dropout": 0.0}


def qformer_config_json(cfg: ModelConfig, model_type: str) -> dict:
    from owl_jax.models.connectors import feature_dim
    q = cfg.qformer
    return {"model_type": model_type, "hidden_size": q.hidden_size, "num_hidden_layers": q.num_layers,
            "num_attention_heads": q.num_heads, "intermediate_size": q.intermediate_size, "hidden_act": q.hidden_act,
            "hidden_dropout_prob": q.hidden_dropout, "attention_probs_dropout_prob": q.attention_dropout,
            "max_position_embeddings": q.max_position_embeddings, "layer_norm_eps": q.layer_norm_eps,
            "cross_attention_frequency": q.cross_attention_frequency, "encoder_hidden_size": feature_dim(cfg),
            "vocab_size": q.vocab_size, "pad_token_id": 0}


def blip2_hf_config(cfg: ModelConfig, layout: str | None = None, *, dtype: str) -> dict:
    """`config.json` of a `Blip2ForConditionalGeneration` / `InstructBlipForConditionalGeneration` directory."""
    from owl_jax.convert import hf_configs
    layout = layout or layout_of(cfg)
    check_exportable(cfg, layout)
    model_type, vision_type, qformer_type = _SUB_TYPES[layout]
    text = hf_configs.llama_config(cfg.text, dtype=dtype)
    text.pop("architectures")
    return {"architectures": [_ARCHITECTURES[layout]], "model_type": model_type,
            "num_query_tokens": cfg.qformer.num_queries, "image_token_index": image_token_index(cfg),
            "tie_word_embeddings": cfg.text.tie_word_embeddings, "torch_dtype": dtype,
            "vision_config": vision_config_json(cfg.vision, vision_type),
            "qformer_config": qformer_config_json(cfg, qformer_type), "text_config": text}


def processor_files(cfg: ModelConfig, layout: str | None = None) -> dict[str, dict]:
    """`preprocessor_config.json` (BlipImageProcessor: bicubic square resize, CLIP mean/std, as owl-jax
    preprocesses) and `processor_config.json` (`num_query_tokens` image tokens per image)."""
    from owl_jax.convert.hf_configs import CLIP_IMAGE_MEAN, CLIP_IMAGE_STD
    layout = layout or layout_of(cfg)
    s = cfg.vision.image_size
    processor = "InstructBlipProcessor" if layout == "instructblip-hf" else "Blip2Processor"
    return {"preprocessor_config.json": {"image_processor_type": "BlipImageProcessor", "do_resize": True,
                                         "size": {"height": s, "width": s}, "resample": 3, "do_rescale": True,
                                         "rescale_factor": 1 / 255, "do_normalize": True,
                                         "image_mean": CLIP_IMAGE_MEAN, "image_std": CLIP_IMAGE_STD,
                                         "do_convert_rgb": True},
            "processor_config.json": {"processor_class": processor, "num_query_tokens": cfg.qformer.num_queries}}


# ------------------------------------------------------------------------------------------------
# Configs in
# ------------------------------------------------------------------------------------------------


def model_config_from_blip2_hf(c: dict, base: ModelConfig | None = None) -> ModelConfig:
    """A BLIP-2 / InstructBLIP `config.json` -> ModelConfig (non-architecture settings from `base`). The LLM
    must be LLaMA-like (`text_config.model_type` llama); for other LLMs the text section is `base`'s."""
    from owl_jax.convert.mplug_owl import text_config_from_hf
    base = base or ModelConfig()
    layout = _MODEL_TYPES.get(c.get("model_type"))
    if layout is None:
        raise CheckpointMismatchError(f"model_type {c.get('model_type')!r} is not blip-2 or instructblip")
    v, q = c.get("vision_config") or {}, c.get("qformer_config") or {}
    if not v.get("qkv_bias", True):
        raise CheckpointMismatchError("vision_config.qkv_bias false: owl-jax's BLIP-2 tower has q and v biases")
    vision = dataclasses.replace(
        base.vision, kind="blip2", hidden_size=v.get("hidden_size", 1408), intermediate_size=v.get("intermediate_size", 6144),
        num_layers=v.get("num_hidden_layers", 39), num_heads=v.get("num_attention_heads", 16),
        image_size=_int(v.get("image_size", 224)), patch_size=_int(v.get("patch_size", 14)), num_channels=3,
        layer_norm_eps=float(v.get("layer_norm_eps", 1e-6)), hidden_act=v.get("hidden_act", "gelu"))
    defaults = QFormerConfig()
    positions = q.get("max_position_embeddings", 512)
    qformer = QFormerConfig(
        hidden_size=q.get("hidden_size", 768), num_layers=q.get("num_hidden_layers", 12),
        num_heads=q.get("num_attention_heads", 12), intermediate_size=q.get("intermediate_size", 3072),
        num_queries=c.get("num_query_tokens", 32), cross_attention_frequency=q.get("cross_attention_frequency", 2),
        layer_norm_eps=float(q.get("layer_norm_eps", 1e-12)), hidden_act=q.get("hidden_act", "gelu"),
        hidden_dropout=float(q.get("hidden_dropout_prob", 0.1)),
        attention_dropout=float(q.get("attention_probs_dropout_prob", 0.1)),
        text_input=layout == "instructblip-hf", vocab_size=q.get("vocab_size", 30522),
        max_position_embeddings=positions, max_text_len=min(base.qformer.max_text_len, positions),
        query_init_std=base.qformer.query_init_std if base.connector == "qformer" else defaults.query_init_std)
    text = c.get("text_config") or {}
    if text.get("model_type", "llama") == "llama":
        text_cfg = text_config_from_hf({**text, "tie_word_embeddings": c.get("tie_word_embeddings",
                                                                             text.get("tie_word_embeddings", False))})
    else:
        text_cfg = base.text
    index = c.get("image_token_index", c.get("image_token_id"))
    return dataclasses.replace(base, vision=vision, qformer=qformer, text=text_cfg, connector="qformer",
                               vision_feature_layer=None, vision_feature_select_strategy="",
                               vision_feature_post_layernorm=None,
                               image_token_index=int(index) if index is not None else -1)


def _int(x) -> int:
    return int(x[0] if isinstance(x, (list, tuple)) else x)


def read_blip2_config(directory: str | os.PathLike, base: ModelConfig | None = None) -> ModelConfig:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise io.WeightFileError(f"{directory}: no config.json")
    return model_config_from_blip2_hf(json.loads(path.read_text()), base)


# The settings that shapes do not show: a checkpoint that disagrees on them would load and compute wrongly.
_CHECKED = {"vision": ("kind", "num_heads", "layer_norm_eps", "hidden_act", "image_size", "patch_size"),
            "qformer": ("num_heads", "layer_norm_eps", "hidden_act", "cross_attention_frequency", "text_input",
                        "num_queries"),
            "text": ("num_heads", "num_kv_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling",
                     "tie_word_embeddings")}


def config_differences(want: ModelConfig, got: ModelConfig, *, llm: bool = True) -> list[str]:
    out = []
    for section, names in _CHECKED.items():
        if section == "text" and not llm:
            continue
        for name in names:
            a, b = getattr(getattr(want, section), name), getattr(getattr(got, section), name)
            if a != b:
                out.append(f"{section}.{name}: checkpoint {a!r}, model {b!r}")
    return out


def load_blip2_checked(model: nnx.Module, cfg: ModelConfig, path: str | os.PathLike,
                       log: Callable[[str], None] = lambda s: None) -> str:
    """`init.blip2_from`: `load_blip2` after checking the directory's `config.json` (if any) against the
    model config on the settings shapes do not show (head counts, epsilons, activations, ...)."""
    config = Path(path) / "config.json"
    if config.is_file():
        c = json.loads(config.read_text())
        llm = (c.get("text_config") or {}).get("model_type", "llama") == "llama"
        diff = config_differences(model_config_from_blip2_hf(c, cfg), cfg, llm=llm)
        if diff:
            raise CheckpointMismatchError(f"{config} does not match the model config: " + "; ".join(diff))
    layout = load_blip2(model, cfg, path, log=log)
    log(f"loaded BLIP-2 weights ({layout}) from {path}")
    return layout
