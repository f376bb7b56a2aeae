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
from owl_jax.convert.sources import DictSource, TensorSource, read_all

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


class HFClipAsOfficial(TensorSource):
    """A HF `CLIPVisionModel` source (keys with or without `vision_model.`) seen under the official
    mPLUG-Owl vision keys, lazily: reading a fused `query_key_value` tensor reads and interleaves q/k/v,
    anything else is a rename. Keys it does not know stay visible (without the prefix), so the importer
    reports them as unexpected; the `position_ids` buffer is dropped."""

    def __init__(self, source: TensorSource, cfg: VisionConfig):
        self._source = source
        self.name = source.name
        self._cfg = cfg
        keys = source.keys()
        self._prefix = "vision_model." if any(k.startswith("vision_model.") for k in keys) else ""
        # official key -> HF keys (without prefix) it is made of
        self._parts: dict[str, tuple[str, ...]] = {
            "embeddings.cls_token": ("embeddings.class_embedding",),
            "embeddings.patch_embed.weight": ("embeddings.patch_embedding.weight",),
            "embeddings.position_embedding": ("embeddings.position_embedding.weight",),
        }
        for old, new in (("pre_layrnorm", "embeddings.pre_layernorm"), ("post_layernorm", "post_layernorm")):
            for suffix in ("weight", "bias"):
                self._parts[f"{new}.{suffix}"] = (f"{old}.{suffix}",)
        renames = {"self_attn.dense": "self_attn.out_proj", "input_layernorm": "layer_norm1",
                   "post_attention_layernorm": "layer_norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
        for i in range(cfg.num_layers):
            k = f"encoder.layers.{i}"
            for suffix in ("weight", "bias"):
                self._parts[f"{k}.self_attn.query_key_value.{suffix}"] = tuple(
                    f"{k}.self_attn.{n}_proj.{suffix}" for n in "qkv")
                for ours, theirs in renames.items():
                    self._parts[f"{k}.{ours}.{suffix}"] = (f"{k}.{theirs}.{suffix}",)
        have = {k[len(self._prefix):] for k in keys if k.startswith(self._prefix)}
        missing = sorted(h for parts in self._parts.values() for h in parts if h not in have)
        if missing:
            shown = ", ".join(repr(m) for m in missing[:10]) + (f", ... ({len(missing)} in all)" if len(missing) > 10 else "")
            raise CheckpointMismatchError(f"{self.name} is not a CLIP vision checkpoint of this size: missing {shown}")
        used = {h for parts in self._parts.values() for h in parts} | {"embeddings.position_ids"}
        for h in sorted(have - used):  # passed through under their own names (reported as unexpected)
            self._parts[h] = (h,)
        self._keys = list(self._parts)

    def keys(self) -> list[str]:
        return list(self._keys)

    def __contains__(self, key: str) -> bool:
        return key in self._parts

    def _hf(self, key: str) -> tuple[str, ...]:
        return tuple(self._prefix + h for h in self._parts[key])

    def shape(self, key: str) -> tuple[int, ...]:
        parts = self._hf(key)
        shape = self._source.shape(parts[0])
        if len(parts) == 3:  # fused q/k/v
            shapes = [tuple(self._source.shape(p)) for p in parts]
            if len(set(shapes)) > 1 or shape[0] % self._cfg.num_heads:
                raise ValueError(f"q/k/v projections of shapes {shapes} cannot be fused over "
                                 f"{self._cfg.num_heads} heads")
            return (3 * shape[0],) + tuple(shape[1:])
        if key == "embeddings.cls_token":
            return (1, 1, int(np.prod(shape)))
        if key == "embeddings.position_embedding":
            return (1,) + tuple(shape)
        return tuple(shape)

    def dtype(self, key: str) -> np.dtype:
        return self._source.dtype(self._hf(key)[0])

    def read(self, key: str) -> np.ndarray:
        parts = self._hf(key)
        if len(parts) == 3:
            return interleave_qkv(*(self._source.read(p) for p in parts), self._cfg.num_heads)
        x = self._source.read(parts[0])
        if key == "embeddings.cls_token":
            return x.reshape(1, 1, -1)
        if key == "embeddings.position_embedding":
            return x[None]
        return x


def hf_clip_to_official(tensors: dict[str, np.ndarray], cfg: VisionConfig, *,
                        source: str = "checkpoint") -> dict[str, np.ndarray]:
    """HF `CLIPVisionModel` tensors (optionally under `vision_model.`) -> official mPLUG-Owl vision keys
    (the eager form of `HFClipAsOfficial`)."""
    return read_all(HFClipAsOfficial(DictSource(tensors, source), cfg))


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
