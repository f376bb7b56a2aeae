"""Vision tower weights: the official mPLUG-Owl layout and Hugging Face `CLIPVisionModel`.

The official tower fuses q/k/v into one `query_key_value` Linear whose outputs are ordered
[heads, 3, head_dim]; HF CLIP has separate q/k/v projections. Importing HF CLIP therefore interleaves
per head (and exporting de-interleaves); concatenating [q; k; v] instead would load without error and
give wrong numbers (~3 in the logits on the golden case).
"""

from __future__ import annotations

import numpy as np

from owl_jax.config import VisionConfig
from owl_jax.convert.keymap import CheckpointMismatchError, TensorRule, layer_norm, linear, reshape_to

TOWER = "vision_model"  # owl-jax path of the vision tower
STACK = f"{TOWER}.layers.layers"


def _conv_to_jax(w: np.ndarray) -> np.ndarray:
    return np.transpose(w, (2, 3, 1, 0))  # (D, C, p, p) -> (p, p, C, D)


def _conv_to_torch(k: np.ndarray) -> np.ndarray:
    return np.transpose(k, (3, 2, 0, 1))


def official_vision_rules(cfg: VisionConfig) -> list[TensorRule]:
    """Keys of `vision_model.*` in the official checkpoint (without the `vision_model.` prefix)."""
    d, p = cfg.hidden_size, cfg.num_positions
    rules = [
        TensorRule("embeddings.cls_token", f"{TOWER}.cls_token", reshape_to((d,)), reshape_to((1, 1, d))),
        TensorRule("embeddings.patch_embed.weight", f"{TOWER}.patch_embed", _conv_to_jax, _conv_to_torch),
        TensorRule("embeddings.position_embedding", f"{TOWER}.position_embedding", reshape_to((p, d)),
                   reshape_to((1, p, d))),
        *layer_norm("embeddings.pre_layernorm", f"{TOWER}.pre_layernorm"),
        *layer_norm("post_layernorm", f"{TOWER}.post_layernorm"),
    ]
    for i in range(cfg.num_layers):
        k, s = f"encoder.layers.{i}", f"{STACK}.{i}"
        rules += [
            *layer_norm(f"{k}.input_layernorm", f"{s}.input_layernorm"),
            *linear(f"{k}.self_attn.query_key_value", f"{s}.self_attn.query_key_value", bias=True),
            *linear(f"{k}.self_attn.dense", f"{s}.self_attn.dense", bias=True),
            *layer_norm(f"{k}.post_attention_layernorm", f"{s}.post_attention_layernorm"),
            *linear(f"{k}.mlp.fc1", f"{s}.mlp.fc1", bias=True),
            *linear(f"{k}.mlp.fc2", f"{s}.mlp.fc2", bias=True),
        ]
    return rules


def interleave_qkv(q: np.ndarray, k: np.ndarray, v: np.ndarray, num_heads: int) -> np.ndarray:
    """Separate q/k/v (out-major: weights (D, in) or biases (D,)) -> fused rows ordered [heads, 3, hd]."""
    d = q.shape[0]
    rest = q.shape[1:]
    parts = [x.reshape((num_heads, d // num_heads) + rest) for x in (q, k, v)]
    return np.stack(parts, axis=1).reshape((3 * d,) + rest)


def split_qkv(fused: np.ndarray, num_heads: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of `interleave_qkv`."""
    d = fused.shape[0] // 3
    rest = fused.shape[1:]
    parts = fused.reshape((num_heads, 3, d // num_heads) + rest)
    return tuple(parts[:, j].reshape((d,) + rest) for j in range(3))


def hf_clip_to_official(tensors: dict[str, np.ndarray], cfg: VisionConfig, *,
                        source: str = "checkpoint") -> dict[str, np.ndarray]:
    """HF `CLIPVisionModel` tensors (optionally under `vision_model.`) -> official mPLUG-Owl vision keys."""
    try:
        return _hf_clip_to_official(tensors, cfg)
    except KeyError as e:
        raise CheckpointMismatchError(f"{source} is not a CLIP vision checkpoint of this size: "
                                      f"missing {e.args[0]!r}") from None


def _hf_clip_to_official(tensors: dict[str, np.ndarray], cfg: VisionConfig) -> dict[str, np.ndarray]:
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in tensors) else ""
    t = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    d = cfg.hidden_size
    out = {
        "embeddings.cls_token": t.pop("embeddings.class_embedding").reshape(1, 1, d),
        "embeddings.patch_embed.weight": t.pop("embeddings.patch_embedding.weight"),
        "embeddings.position_embedding": t.pop("embeddings.position_embedding.weight")[None],
    }
    t.pop("embeddings.position_ids", None)
    renames = {"pre_layrnorm": "embeddings.pre_layernorm", "post_layernorm": "post_layernorm"}
    for old, new in renames.items():
        for suffix in ("weight", "bias"):
            out[f"{new}.{suffix}"] = t.pop(f"{old}.{suffix}")
    for i in range(cfg.num_layers):
        k = f"encoder.layers.{i}"
        for suffix in ("weight", "bias"):
            q, kk, v = (t.pop(f"{k}.self_attn.{n}_proj.{suffix}") for n in "qkv")
            out[f"{k}.self_attn.query_key_value.{suffix}"] = interleave_qkv(q, kk, v, cfg.num_heads)
            out[f"{k}.self_attn.dense.{suffix}"] = t.pop(f"{k}.self_attn.out_proj.{suffix}")
            out[f"{k}.input_layernorm.{suffix}"] = t.pop(f"{k}.layer_norm1.{suffix}")
            out[f"{k}.post_attention_layernorm.{suffix}"] = t.pop(f"{k}.layer_norm2.{suffix}")
            out[f"{k}.mlp.fc1.{suffix}"] = t.pop(f"{k}.mlp.fc1.{suffix}")
            out[f"{k}.mlp.fc2.{suffix}"] = t.pop(f"{k}.mlp.fc2.{suffix}")
    out.update(t)  # anything left over is reported as unexpected by the importer
    return out


def official_to_hf_clip(tensors: dict[str, np.ndarray], cfg: VisionConfig) -> dict[str, np.ndarray]:
    """Inverse of `hf_clip_to_official` (keys without a `vision_model.` prefix)."""
    t = dict(tensors)
    out = {
        "embeddings.class_embedding": t.pop("embeddings.cls_token").reshape(-1),
        "embeddings.patch_embedding.weight": t.pop("embeddings.patch_embed.weight"),
        "embeddings.position_embedding.weight": t.pop("embeddings.position_embedding")[0],
    }
    for suffix in ("weight", "bias"):
        out[f"pre_layrnorm.{suffix}"] = t.pop(f"embeddings.pre_layernorm.{suffix}")
        out[f"post_layernorm.{suffix}"] = t.pop(f"post_layernorm.{suffix}")
    for i in range(cfg.num_layers):
        k = f"encoder.layers.{i}"
        for suffix in ("weight", "bias"):
            q, kk, v = split_qkv(t.pop(f"{k}.self_attn.query_key_value.{suffix}"), cfg.num_heads)
            out.update({f"{k}.self_attn.q_proj.{suffix}": q, f"{k}.self_attn.k_proj.{suffix}": kk,
                        f"{k}.self_attn.v_proj.{suffix}": v})
            out[f"{k}.self_attn.out_proj.{suffix}"] = t.pop(f"{k}.self_attn.dense.{suffix}")
            out[f"{k}.layer_norm1.{suffix}"] = t.pop(f"{k}.input_layernorm.{suffix}")
            out[f"{k}.layer_norm2.{suffix}"] = t.pop(f"{k}.post_attention_layernorm.{suffix}")
            out[f"{k}.mlp.fc1.{suffix}"] = t.pop(f"{k}.mlp.fc1.{suffix}")
            out[f"{k}.mlp.fc2.{suffix}"] = t.pop(f"{k}.mlp.fc2.{suffix}")
    return out
