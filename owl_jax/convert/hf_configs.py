"""The JSON configs that go with exported weights, each in the schema its consumer reads.

- `llama_config`: Hugging Face `LlamaConfig` (`config.json` of a `LlamaForCausalLM` directory). RoPE
  settings use the `rope_theta` / `rope_scaling` keys, which transformers 4.3x reads as they are and
  transformers 5 converts to `rope_parameters`; `torch_dtype` likewise.
- `clip_vision_config`: `CLIPVisionConfig` for a `CLIPVisionModel` directory (QuickGELU, mPLUG-Owl's
  LayerNorm epsilon), plus `clip_image_processor_config` (`preprocessor_config.json`) with the official
  inference preprocessing: bicubic resize to a square, no crop, CLIP mean/std.
- `official_config`: the released mPLUG-Owl schema (`MplugOwlConfig` of the official code, as in the
  golden `mplug_owl_tiny/config.json`): `vision_config`, `visual_abstractor_config`, `text_config`.
  The official code runs on transformers 4.28, whose LLaMA has no grouped-query attention, rope scaling
  or tied embeddings; such models export fine but only newer LLaMA code reads those keys.
- `generation_config`: token ids, and for `mplug-owl` the official demo's sampling defaults (DESIGN.md §2).
- `peft_adapter_config`: PEFT `adapter_config.json` with the narrowest `target_modules` that covers exactly
  the adapted layers.
"""

from __future__ import annotations

from owl_jax.config import ModelConfig, TextConfig, VisionConfig
from owl_jax.convert.keymap import TensorRule

# OpenAI CLIP preprocessing constants (DESIGN.md §4), as CLIPImageProcessor writes them.
CLIP_IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]

# Sampling defaults of the official mPLUG-Owl demo (DESIGN.md §2).
OFFICIAL_GENERATION = {"do_sample": True, "top_k": 3, "top_p": 0.9, "max_length": 512, "no_repeat_ngram_size": 2}


def _rope_scaling(text: TextConfig) -> dict | None:
    s = text.rope_scaling
    if s.type in ("none", "default", ""):
        return None
    if s.type == "linear":
        return {"rope_type": "linear", "type": "linear", "factor": s.factor}
    if s.type == "llama3":
        return {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position_embeddings}
    raise ValueError(f"rope scaling type {s.type!r} has no Hugging Face equivalent")


def _llama_fields(text: TextConfig) -> dict:
    return {
        "model_type": "llama",
        "vocab_size": text.vocab_size,
        "hidden_size": text.hidden_size,
        "intermediate_size": text.intermediate_size,
        "num_hidden_layers": text.num_layers,
        "num_attention_heads": text.num_heads,
        "num_key_value_heads": text.kv_heads,
        "head_dim": text.dim_per_head,
        "hidden_act": "silu",
        "max_position_embeddings": text.max_position_embeddings,
        "initializer_range": 0.02,
        "rms_norm_eps": text.rms_norm_eps,
        "use_cache": True,
        "pad_token_id": text.pad_token_id,
        "bos_token_id": text.bos_token_id,
        "eos_token_id": text.eos_token_id,
        "tie_word_embeddings": text.tie_word_embeddings,
        "rope_theta": text.rope_theta,
        "rope_scaling": _rope_scaling(text),
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
    }


def llama_config(text: TextConfig, *, dtype: str) -> dict:
    return {"architectures": ["LlamaForCausalLM"], **_llama_fields(text), "torch_dtype": dtype}


def clip_vision_config(vision: VisionConfig, *, dtype: str) -> dict:
    return {
        "architectures": ["CLIPVisionModel"],
        "model_type": "clip_vision_model",
        "hidden_size": vision.hidden_size,
        "intermediate_size": vision.intermediate_size,
        "projection_dim": 768,
        "num_hidden_layers": vision.num_layers,
        "num_attention_heads": vision.num_heads,
        "num_channels": vision.num_channels,
        "image_size": vision.image_size,
        "patch_size": vision.patch_size,
        "hidden_act": vision.hidden_act,
        "layer_norm_eps": vision.layer_norm_eps,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
        "torch_dtype": dtype,
    }


def clip_image_processor_config(vision: VisionConfig) -> dict:
    """`preprocessor_config.json` in the form every transformers version reads: `size` as
    `{"shortest_edge": S}` and `crop_size` as `{"height", "width"}`. transformers 4.28-4.31 (which the
    official mPLUG-Owl code needs) refuse a `{"height", "width"}` size ("must contain the key
    `shortest_edge`"), and the official `MplugOwlProcessor` reads `size["shortest_edge"]` to squash every
    image to S x S before the CLIP processor runs — exactly owl-jax's own preprocessing (bicubic resize to a
    square, no aspect kept). A plain `CLIPImageProcessor` then resizes and centre-crops an S x S image to
    itself; on a non-square image it would crop, so resize to S x S first, as the official processor does."""
    s = vision.image_size
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True, "size": {"shortest_edge": s}, "resample": 3,  # PIL bicubic
        "do_center_crop": True, "crop_size": {"height": s, "width": s},
        "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": CLIP_IMAGE_MEAN, "image_std": CLIP_IMAGE_STD,
        "do_convert_rgb": True,
    }


def official_config(cfg: ModelConfig, *, dtype: str) -> dict:
    v, a = cfg.vision, cfg.abstractor
    vision = {
        "model_type": "mplug_owl_vision_model",
        "hidden_size": v.hidden_size,
        "intermediate_size": v.intermediate_size,
        "projection_dim": 768,
        "num_hidden_layers": v.num_layers,
        "num_attention_heads": v.num_heads,
        "num_channels": v.num_channels,
        "image_size": v.image_size,
        "patch_size": v.patch_size,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": v.layer_norm_eps,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
        "use_flash_attn": False,
    }
    abstractor = {
        "model_type": "mplug_owl_visual_abstract",
        "hidden_size": a.hidden_size,
        "num_hidden_layers": a.num_layers,
        "num_attention_heads": a.num_heads,
        "intermediate_size": a.intermediate_size,
        "attention_probs_dropout_prob": a.attention_dropout,
        "initializer_range": 0.02,
        "layer_norm_eps": a.layer_norm_eps,
        "encoder_hidden_size": v.hidden_size,
    }
    text = _llama_fields(cfg.text)
    if text["rope_scaling"] is None:
        del text["rope_scaling"]  # (unknown to the official transformers 4.28)
    return {
        "architectures": ["MplugOwlForConditionalGeneration"],
        "model_type": "mplug-owl",
        "num_query_tokens": a.num_queries,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "tie_word_embeddings": cfg.text.tie_word_embeddings,
        "use_decoder_only_language_model": True,
        "torch_dtype": dtype,
        "vision_config": vision,
        "visual_abstractor_config": abstractor,
        "text_config": text,
    }


def generation_config(text: TextConfig, *, official_demo: bool = False) -> dict:
    ids = {"bos_token_id": text.bos_token_id, "eos_token_id": text.eos_token_id, "pad_token_id": text.pad_token_id}
    return {**ids, **(OFFICIAL_GENERATION if official_demo else {})}


def _module(key: str) -> str:
    return key[: -len(".weight")]


def peft_target_modules(adapted: list[str], base_rules: list[TensorRule], *, official: bool) -> str | list[str]:
    """The narrowest PEFT `target_modules` selecting exactly the `adapted` module names (checkpoint names,
    e.g. `model.layers.0.self_attn.q_proj`) among the base model's Linear layers: leaf names when every
    layer with those leaf names is adapted (`["q_proj", "v_proj"]`; for the official layout the golden
    adapter's regex over `language_model`), else the full names."""
    linears = [_module(r.key) for r in base_rules if r.path.endswith(".kernel")]
    leaves = sorted({m.rsplit(".", 1)[-1] for m in adapted})
    same_leaves = {m for m in linears if m.rsplit(".", 1)[-1] in leaves}
    if official:
        in_llm = {m for m in same_leaves if m.startswith("language_model.")}
        if set(adapted) == in_llm:
            return rf".*language_model.*\.({'|'.join(leaves)})"
    if set(adapted) == same_leaves:
        return leaves
    return sorted(adapted)


def peft_adapter_config(cfg: ModelConfig, adapted: list[str], base_rules: list[TensorRule], *, layout: str,
                        base_model: str = "") -> dict:
    """`adapter_config.json` for adapters on the `adapted` modules of the `layout` (`mplug-owl` | `hf-llama`)
    base. LoRA scaling is alpha / r (not rank-stabilised)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if layout == "hf-llama" else None,
        "base_model_name_or_path": base_model,
        "r": cfg.lora.rank,
        "lora_alpha": cfg.lora.alpha,
        "lora_dropout": cfg.lora.dropout,
        "target_modules": peft_target_modules(adapted, base_rules, official=layout == "mplug-owl"),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_rslora": False,
    }
