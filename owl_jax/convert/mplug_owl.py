"""The official mPLUG-Owl checkpoint layout (`query_tokens`, `vision_model.*`, `abstractor.*`,
`language_model.*`) and PEFT LoRA adapters for it; plus Hugging Face LLaMA / CLIP imports into the
composite model."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
from flax import nnx

from owl_jax.config import (AbstractorConfig, ModelConfig, RopeScalingConfig, TextConfig, VisionConfig)
from owl_jax.convert import clip, io
from owl_jax.convert.abstractor import abstractor_rules
from owl_jax.convert.keymap import (CheckpointMismatchError, TensorRule, params_to_tensors, prefixed,
                                    tensors_to_params, transpose)
from owl_jax.convert.llama import IGNORED_BUFFERS, llama_rules
from owl_jax.convert.sources import FilteredSource, open_source
from owl_jax.convert.state import assign_canonical_params, canonical_params
from owl_jax.convert.stream import stream_params


def official_rules(cfg: ModelConfig) -> list[TensorRule]:
    return [*prefixed(clip.official_vision_rules(cfg.vision), key_prefix="vision_model."),
            *abstractor_rules(cfg.abstractor, cfg.text.hidden_size),
            *prefixed(llama_rules(cfg.text), key_prefix="language_model.")]


def _is_lora(path: str) -> bool:
    return ".lora." in path


def _expect_model_type(path: str | os.PathLike, allowed: tuple[str, ...], what: str) -> None:
    """Refuse a checkpoint directory whose `config.json` names another architecture (say, a CLIP tower given
    as the LLM) with that name, instead of a long list of missing and unexpected keys."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise io.WeightFileError(f"{config}: not a readable config ({e})") from e
    if model_type is not None and model_type not in allowed:
        raise CheckpointMismatchError(f"{path} is a {model_type!r} checkpoint (config.json model_type), not a "
                                      f"{what} checkpoint (model_type {' or '.join(map(repr, allowed))})")


def load_official(model: nnx.Module, cfg: ModelConfig, path: str | os.PathLike) -> None:
    """Load an official mPLUG-Owl checkpoint (file or HF directory) into every base parameter, streaming
    (one tensor in host memory at a time, each placed with its parameter's sharding)."""
    _expect_model_type(path, ("mplug-owl", "mplug_owl"), "mPLUG-Owl")
    stream_params(model, open_source(path), official_rules(cfg), include=lambda p: not _is_lora(p),
                  ignore=IGNORED_BUFFERS)


def load_hf_llama(model: nnx.Module, cfg: ModelConfig, path: str | os.PathLike) -> None:
    """Load HF `LlamaForCausalLM` weights into the language model only (streaming)."""
    _expect_model_type(path, ("llama",), "LLaMA")
    source = open_source(path)
    if cfg.text.tie_word_embeddings and "lm_head.weight" in source:
        # torch.save'd state dicts (legacy .bin) of tied models keep the alias; drop it only if it is one.
        embed = "model.embed_tokens.weight"
        if embed in source and not np.array_equal(source.read("lm_head.weight"), source.read(embed)):
            raise CheckpointMismatchError(f"{path}: config ties the embeddings but lm_head.weight differs from "
                                          f"model.embed_tokens.weight")
        source = FilteredSource(source, lambda k: k != "lm_head.weight")
    stream_params(model, source, llama_rules(cfg.text), ignore=IGNORED_BUFFERS,
                  include=lambda p: p.startswith("language_model.") and not _is_lora(p))


def load_hf_clip_vision(model: nnx.Module, cfg: ModelConfig, path: str | os.PathLike) -> None:
    """Load HF `CLIPVisionModel` (or full `CLIPModel`) weights into the vision tower only (streaming; q/k/v
    are fused per layer as they are read)."""
    _expect_model_type(path, ("clip", "clip_vision_model"), "CLIP")
    source = open_source(path)
    if any(k.startswith("text_model.") for k in source.keys()):
        source = FilteredSource(source, lambda k: k.startswith("vision_model."))
    stream_params(model, clip.HFClipAsOfficial(source, cfg.vision), clip.official_vision_rules(cfg.vision),
                  include=lambda p: p.startswith("vision_model.") and not _is_lora(p))


# ------------------------------------------------------------------------------------------------
# Export (tensor dicts in PyTorch layouts; the export CLI writes them with configs and tokenizers)
# ------------------------------------------------------------------------------------------------


def _base_params(model: nnx.Module) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in canonical_params(model).items() if not _is_lora(k)}


def _rotary_buffers(cfg: ModelConfig, prefix: str) -> dict[str, np.ndarray]:
    """`rotary_emb.inv_freq` buffers as transformers < 4.31 (and so the official release) stores them."""
    from owl_jax.models.llama import rope_inv_freq
    inv_freq = rope_inv_freq(cfg.text)
    return {f"{prefix}model.layers.{i}.self_attn.rotary_emb.inv_freq": inv_freq.copy()
            for i in range(cfg.text.num_layers)}


def export_official(model: nnx.Module, cfg: ModelConfig, *, rotary_buffers: bool = True) -> dict[str, np.ndarray]:
    """Base weights (LoRA unmerged adapters excluded; merge first to fold them in) in the official layout."""
    tensors = params_to_tensors(_base_params(model), official_rules(cfg))
    if rotary_buffers:
        tensors.update(_rotary_buffers(cfg, "language_model."))
    return tensors


def export_hf_llama(model: nnx.Module, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """The language model as `LlamaForCausalLM` tensors."""
    return params_to_tensors(_base_params(model), llama_rules(cfg.text))


def export_hf_clip_vision(model: nnx.Module, cfg: ModelConfig, *, with_prefix: bool = False) -> dict[str, np.ndarray]:
    """The vision tower as `CLIPVisionModel` tensors: keys as transformers 5 writes them (no prefix), or
    `with_prefix` under `vision_model.` as transformers 4 writes them — which both 4.x and 5.x load."""
    official = params_to_tensors(_base_params(model), clip.official_vision_rules(cfg.vision))
    tensors = clip.official_to_hf_clip(official, cfg.vision)
    return {f"vision_model.{k}": v for k, v in tensors.items()} if with_prefix else tensors


def export_peft_lora(model: nnx.Module, cfg: ModelConfig, *, layout: str = "mplug-owl") -> dict[str, np.ndarray]:
    """Unmerged LoRA adapters as PEFT `adapter_model` tensors for the official layout or a bare LLaMA."""
    base = official_rules(cfg) if layout == "mplug-owl" else llama_rules(cfg.text)
    params = {k: np.asarray(v) for k, v in canonical_params(model).items() if _is_lora(k)}
    if not params:
        raise CheckpointMismatchError("the model has no LoRA adapters to export")
    out = {}
    for rule in base:
        if not rule.path.endswith(".kernel"):
            continue
        dense = rule.path[: -len(".kernel")]
        module = rule.key[: -len(".weight")]
        for leaf, which in (("lora_a", "A"), ("lora_b", "B")):
            name = f"{dense}.lora.{leaf}"
            if name in params:
                out[f"base_model.model.{module}.lora_{which}.weight"] = np.ascontiguousarray(params.pop(name).T)
    if params:
        raise CheckpointMismatchError(f"adapters with no {layout} key: {sorted(params)[:10]}")
    return out


# ------------------------------------------------------------------------------------------------
# PEFT LoRA adapters
# ------------------------------------------------------------------------------------------------

_PEFT_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])(?:\.default)?\.weight$")


def lora_rules_from_keys(keys: list[str], base_rules: list[TensorRule]) -> list[TensorRule]:
    """PEFT adapter keys -> rules onto `<dense>.lora.lora_{a,b}`, resolving each adapted module through
    the base model's own key map (so any target module works, not just q/v)."""
    kernel_paths = {r.key[: -len(".weight")]: r.path[: -len(".kernel")] for r in base_rules
                    if r.path.endswith(".kernel")}
    rules, unknown = [], []
    for key in keys:
        m = _PEFT_KEY.match(key)
        if not m or m["module"] not in kernel_paths:
            unknown.append(key)
            continue
        leaf = "lora_a" if m["which"] == "A" else "lora_b"
        rules.append(TensorRule(key, f"{kernel_paths[m['module']]}.lora.{leaf}", transpose, transpose))
    if unknown:
        raise CheckpointMismatchError(f"adapter keys that match no Linear layer of the model: {unknown[:10]}")
    return rules


def load_peft_lora(model: nnx.Module, cfg: ModelConfig, adapter_dir: str | os.PathLike, *,
                   layout: str = "mplug-owl") -> None:
    """Load a PEFT LoRA adapter (for the official mPLUG-Owl layout or a bare `LlamaForCausalLM`).

    The model must have been built with matching LoRA settings: rank and alpha (which fixes the scaling)
    are checked against `adapter_config.json`.
    """
    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / "adapter_config.json"
    if not config_path.is_file():
        raise io.WeightFileError(f"{adapter_dir}: no adapter_config.json (is this a PEFT adapter directory?)")
    acfg = json.loads(config_path.read_text())
    if acfg.get("r") != cfg.lora.rank or float(acfg.get("lora_alpha", -1)) != float(cfg.lora.alpha):
        raise CheckpointMismatchError(
            f"adapter has r={acfg.get('r')}, lora_alpha={acfg.get('lora_alpha')} but the model was built with "
            f"model.lora.rank={cfg.lora.rank}, model.lora.alpha={cfg.lora.alpha}")
    if layout not in ("mplug-owl", "hf-llama"):
        raise ValueError(f"unknown adapter layout {layout!r} (mplug-owl | hf-llama)")
    base = official_rules(cfg) if layout == "mplug-owl" else llama_rules(cfg.text)
    tensors = io.load_tensors(adapter_dir)
    rules = lora_rules_from_keys(list(tensors), base)
    params = tensors_to_params(tensors, rules, source=str(adapter_dir))
    assign_canonical_params(model, params, include=_is_lora)


# ------------------------------------------------------------------------------------------------
# Configs
# ------------------------------------------------------------------------------------------------


def text_config_from_hf(c: dict) -> TextConfig:
    """`LlamaConfig` dict -> TextConfig (rope scaling from `rope_scaling` or v5 `rope_parameters`)."""
    rope = c.get("rope_scaling") or c.get("rope_parameters") or {}
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    scaling = RopeScalingConfig() if rope_type in ("default", None) else RopeScalingConfig(
        type=rope_type, factor=float(rope.get("factor", 8.0)),
        low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
        high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(rope.get("original_max_position_embeddings", 8192)))
    theta = c.get("rope_theta", rope.get("rope_theta", 10000.0))
    heads = c["num_attention_heads"]
    head_dim = c.get("head_dim") or 0
    if head_dim == c["hidden_size"] // heads:
        head_dim = 0
    return TextConfig(
        vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
        num_layers=c["num_hidden_layers"], num_heads=heads,
        num_kv_heads=0 if c.get("num_key_value_heads", heads) == heads else c["num_key_value_heads"],
        head_dim=head_dim, rms_norm_eps=c.get("rms_norm_eps", 1e-6), rope_theta=float(theta), rope_scaling=scaling,
        max_position_embeddings=c.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
        pad_token_id=c.get("pad_token_id") if c.get("pad_token_id") is not None else 0,
        bos_token_id=c.get("bos_token_id", 1) if c.get("bos_token_id") is not None else 1,
        eos_token_id=_first(c.get("eos_token_id", 2)))


def _first(x):
    return x[0] if isinstance(x, (list, tuple)) else (2 if x is None else x)


def vision_config_from_hf(c: dict) -> VisionConfig:
    return VisionConfig(hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
                        num_layers=c["num_hidden_layers"], num_heads=c["num_attention_heads"],
                        image_size=c["image_size"], patch_size=c["patch_size"],
                        num_channels=c.get("num_channels", 3), layer_norm_eps=c.get("layer_norm_eps", 1e-6),
                        hidden_act=c.get("hidden_act", "quick_gelu"))


def model_config_from_official(c: dict, base: ModelConfig | None = None) -> ModelConfig:
    """Official mPLUG-Owl `config.json` -> ModelConfig (non-architecture settings taken from `base`)."""
    import dataclasses
    a = c["visual_abstractor_config"]
    abstractor = AbstractorConfig(hidden_size=a["hidden_size"], num_layers=a["num_hidden_layers"],
                                  num_heads=a["num_attention_heads"], intermediate_size=a["intermediate_size"],
                                  num_queries=c.get("num_query_tokens", 64),
                                  layer_norm_eps=a.get("layer_norm_eps", 1e-6),
                                  attention_dropout=a.get("attention_probs_dropout_prob", 0.1))
    base = base or ModelConfig()
    return dataclasses.replace(base, vision=vision_config_from_hf(c["vision_config"]), abstractor=abstractor,
                               text=text_config_from_hf(c["text_config"]))


def read_official_config(directory: str | os.PathLike, base: ModelConfig | None = None) -> ModelConfig:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise io.WeightFileError(f"{directory}: no config.json")
    c = json.loads(path.read_text())
    if c.get("model_type") not in ("mplug-owl", "mplug_owl"):
        raise CheckpointMismatchError(f"{path}: model_type {c.get('model_type')!r} is not an mPLUG-Owl checkpoint")
    return model_config_from_official(c, base)
