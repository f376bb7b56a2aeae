"""Analytic model FLOPs of a train step (DESIGN.md §5), for MFU and for checking compiled programs.

Only matrix multiplications are counted (2·m·n·k each). Each matmul's forward cost is multiplied by
how many of its backward products the stage needs:

- ×3 trainable weights whose input gradient is also needed (forward, weight grad, input grad);
- ×2 frozen weights that gradients flow through (forward, input grad), or trainable weights with
  nothing trainable below them (forward, weight grad: e.g. the patch embedding, whose input is pixels);
- ×1 layers with nothing trainable at or below them (forward only);
- attention score/value products (no weights) ×3 when gradients flow through them, else ×1.

`causal_halving` halves the LLM attention term (the MFU convention); XLA's dense attention computes the
full square, so compiled-program checks pass `causal_halving=False`. Remat recomputation is never counted.
"""

from __future__ import annotations

import dataclasses

from owl_jax.config import ModelConfig
from owl_jax.training.stages import STAGES


@dataclasses.dataclass
class StepFlops:
    vision: float = 0.0
    abstractor: float = 0.0
    llm: float = 0.0

    @property
    def total(self) -> float:
        return self.vision + self.abstractor + self.llm


def _patch_embedding(cfg: ModelConfig) -> float:
    """Forward FLOPs per image of the patch embedding."""
    v = cfg.vision
    return 2.0 * v.num_patches * v.patch_size ** 2 * v.num_channels * v.hidden_size


def _vision_parts(cfg: ModelConfig) -> tuple[float, float]:
    """(linear, attention) forward FLOPs per image of the vision transformer layers."""
    v = cfg.vision
    t, d, f = v.num_positions, v.hidden_size, v.intermediate_size
    return v.num_layers * 2.0 * t * (4 * d * d + 2 * d * f), v.num_layers * 4.0 * t * t * d


def _abstractor_parts(cfg: ModelConfig) -> tuple[float, float]:
    """(linear incl. visual_fc, attention) forward FLOPs per image."""
    a = cfg.abstractor
    q, kv, d, f = a.num_queries, a.num_queries + cfg.vision.num_positions, a.hidden_size, a.intermediate_size
    linear = a.num_layers * 2.0 * (q * d * d + 2 * kv * d * d + q * d * d + 3 * q * d * f)
    attention = a.num_layers * 4.0 * q * kv * d
    return linear + 2.0 * q * d * cfg.text.hidden_size, attention


def _llm_parts(cfg: ModelConfig, seq_len: int, causal_halving: bool) -> dict[str, float]:
    """Forward FLOPs per token of one decoder layer's parts, and of the vocabulary projection."""
    t = cfg.text
    n, k, h, d = t.num_heads, t.kv_heads, t.dim_per_head, t.hidden_size
    lora = 0.0
    if cfg.lora.rank:  # adapters on q_proj and v_proj (the default targets): x@a then @b
        lora = 2.0 * cfg.lora.rank * ((d + n * h) + (d + k * h))
    return {"qkv": 2.0 * d * (n * h + 2 * k * h), "o": 2.0 * n * h * d, "mlp": 2.0 * 3 * d * t.intermediate_size,
            "attention": 4.0 * seq_len * n * h * (0.5 if causal_halving else 1.0), "lora": lora,
            "head": 2.0 * d * t.vocab_size}


def _llm_step(cfg: ModelConfig, stage: str, p: dict[str, float]) -> float:
    """Per-token step FLOPs of the LLM. In `instruct_lora` layer 0's q/k/v projections read the frozen
    embeddings, so no input gradient is computed there, nor a key gradient in layer 0's attention."""
    layers = cfg.text.num_layers
    if stage in ("lm_pretrain", "instruct_full"):  # embeddings trainable too: input grads everywhere
        return 3 * (layers * (p["qkv"] + p["o"] + p["mlp"] + p["attention"]) + p["head"])
    if stage == "pretrain":  # frozen; gradients flow through every layer to the visual tokens
        return 2 * (layers * (p["qkv"] + p["o"] + p["mlp"]) + p["head"]) + 3 * layers * p["attention"] \
            + 2 * layers * p["lora"]
    # instruct_lora
    upper = 2 * (p["qkv"] + p["o"] + p["mlp"]) + 3 * p["attention"] + 3 * p["lora"]
    first = p["qkv"] + 2 * (p["o"] + p["mlp"]) + 2.5 * p["attention"] + 3 * p["lora"]
    return first + (layers - 1) * upper + 2 * p["head"]


def step_flops(cfg: ModelConfig, stage: str, *, tokens: int, seq_len: int, images: int,
               causal_halving: bool = True) -> StepFlops:
    """Model FLOPs of one optimizer step over `tokens` LLM positions (rows × seq_len) and `images` images."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}")
    patch = _patch_embedding(cfg)
    v_lin, v_att = _vision_parts(cfg)
    a_lin, a_att = _abstractor_parts(cfg)
    llm = tokens * _llm_step(cfg, stage, _llm_parts(cfg, seq_len, causal_halving))
    if stage == "lm_pretrain":
        return StepFlops(llm=llm)
    if stage == "pretrain":
        return StepFlops(vision=images * (2 * patch + 3 * (v_lin + v_att)), abstractor=images * 3 * (a_lin + a_att),
                         llm=llm)
    return StepFlops(vision=images * (patch + v_lin + v_att), abstractor=images * (a_lin + a_att), llm=llm)


def compiled_flops(compiled) -> float:
    """FLOPs XLA reports for a compiled executable (count scanned bodies once: compile unrolled)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0]
    return float(analysis.get("flops", 0.0))
