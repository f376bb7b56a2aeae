"""Analytic model FLOPs of a train step (DESIGN.md §5), for MFU and for checking compiled programs.

Only matrix multiplications are counted (2·m·n·k each), and what the backward pass adds to each follows
the configured trainable set (`training.trainable` or the stage's preset, resolved by
`owl_jax.training.stages`), the way JAX differentiates: a value *carries a gradient* when a trainable
parameter lies upstream of it (its weights, or anything earlier in the data flow). A matmul `y = x @ W`
then costs its forward pass, plus the weight gradient if `W` trains, plus the input gradient if `x`
carries a gradient:

- ×3 trainable weights whose input carries a gradient;
- ×2 frozen weights that gradients pass through, or trainable weights with nothing trainable below them
  (the patch embedding, whose input is pixels; layer 0's LoRA `a` under frozen embeddings);
- ×1 layers with nothing trainable at or below them (forward only);
- attention score / value products (no weights): forward, plus a gradient for each operand that carries
  one (layer 0 under LoRA on q and v: no key gradient there).

Norm scales, biases and embeddings have no matmul of their own but make what follows them carry a gradient
when they train. The connector is counted by its module (`models.connectors`) from the names of its trained
children (`trained_parts`): the abstractor and LLaVA's projectors as a unit, the Q-Former with its
`language_projection` apart (MiniGPT-4 trains that alone: the Q-Former then runs forward only). `causal_halving` halves the LLM attention term (the MFU convention); XLA's dense
attention computes the full square, so compiled-program checks pass `causal_halving=False`. Remat
recomputation is never counted.
"""

from __future__ import annotations

import dataclasses
import re

from owl_jax.config import ModelConfig, TrainingConfig


@dataclasses.dataclass
class StepFlops:
    vision: float = 0.0
    connector: float = 0.0  # the abstractor or the projector (`owl_jax.models.connectors`)
    llm: float = 0.0

    @property
    def total(self) -> float:
        return self.vision + self.connector + self.llm

    @property
    def abstractor(self) -> float:  # the field's name before connectors other than the abstractor existed
        return self.connector


_INDEX = re.compile(r"\.layers\.\d+\.")


class _Trainable:
    """Lookups into a resolved trainable set by per-layer path (`language_model.layers.3.mlp.up_proj.kernel`);
    a scanned stack's leaf (no layer index) answers for every layer."""

    def __init__(self, names, params):
        self.names, self.params = frozenset(names), frozenset(params)

    @staticmethod
    def _forms(path: str):
        return path, _INDEX.sub(".layers.", path, count=1)

    def __call__(self, path: str) -> bool:
        return any(f in self.names for f in self._forms(path))

    def exists(self, path: str) -> bool:
        return any(f in self.params for f in self._forms(path))

    def under(self, prefix: str) -> bool:
        """Whether any trainable leaf lies under module `prefix`."""
        forms = self._forms(prefix + ".")
        return any(n.startswith(forms) for n in self.names)


def _dense(t: _Trainable, path: str, rows: float, d_in: int, d_out: int, rank: int, x_grad: bool) -> tuple[float, bool]:
    """(step FLOPs, output carries a gradient) of `Dense` `path` over `rows` input rows, with its LoRA
    adapter (x @ a @ b) when the model has one there."""
    w = t(f"{path}.kernel")
    cost = 2.0 * rows * d_in * d_out * (1 + w + x_grad)
    out_grad = x_grad or w or t(f"{path}.bias")
    if rank and t.exists(f"{path}.lora.lora_a"):
        a, b = t(f"{path}.lora.lora_a"), t(f"{path}.lora.lora_b")
        xa_grad = x_grad or a
        cost += 2.0 * rows * d_in * rank * (1 + a + x_grad) + 2.0 * rows * rank * d_out * (1 + b + xa_grad)
        out_grad = out_grad or xa_grad or b
    return cost, out_grad


def _attention(scores: float, values: float, q: bool, k: bool, v: bool) -> float:
    """softmax(q k^T) v: each product's forward, plus the gradient of each operand that carries one."""
    p = q or k
    return scores * (1 + q + k) + values * (1 + p + v)


def _vision(cfg: ModelConfig, t: _Trainable) -> tuple[float, bool]:
    """Per image: (step FLOPs of the tower layers that run, the features carry a gradient). Layers after the
    deepest one the connector reads are not run (LLaVA's layer -2 skips the last)."""
    from owl_jax.models.connectors import vision_features
    v, r, feats = cfg.vision, cfg.lora.rank, vision_features(cfg)
    patch = t("vision_model.patch_embed")
    total = 2.0 * v.num_patches * v.patch_size ** 2 * v.num_channels * v.hidden_size * (1 + patch)
    grad = patch or any(t.under(f"vision_model.{m}") or t(f"vision_model.{m}")
                        for m in ("cls_token", "position_embedding", "pre_layernorm"))
    n, d, f = v.num_positions, v.hidden_size, v.intermediate_size
    for i in range(feats.depth):
        p = f"vision_model.layers.{i}"
        x = grad or t.under(f"{p}.input_layernorm")
        c, qkv = _dense(t, f"{p}.self_attn.query_key_value", n, d, 3 * d, r, x)
        total += c + _attention(2.0 * n * n * d, 2.0 * n * n * d, qkv, qkv, qkv)
        c, out = _dense(t, f"{p}.self_attn.dense", n, d, d, r, qkv)
        total += c
        grad = grad or out
        c, h = _dense(t, f"{p}.mlp.fc1", n, d, f, r, grad or t.under(f"{p}.post_attention_layernorm"))
        total += c
        c, out = _dense(t, f"{p}.mlp.fc2", n, f, d, r, h)
        total += c
        grad = grad or out
    if feats.post_layernorm:
        grad = grad or t.under("vision_model.post_layernorm")
    return total, grad


def _llm(cfg: ModelConfig, t: _Trainable, tokens: float, seq_len: int, causal_halving: bool,
         visual_grad: bool) -> float:
    """Step FLOPs of the decoder over `tokens` positions; the input carries a gradient if the embeddings
    train or the spliced visual tokens carry one."""
    c, r = cfg.text, cfg.lora.rank
    n, k, h, d, f = c.num_heads, c.kv_heads, c.dim_per_head, c.hidden_size, c.intermediate_size
    half = 2.0 * tokens * seq_len * n * h * (0.5 if causal_halving else 1.0)  # each attention product
    grad = visual_grad or t("language_model.embed_tokens")
    total = 0.0
    for i in range(c.num_layers):
        p = f"language_model.layers.{i}"
        x = grad or t.under(f"{p}.input_layernorm")
        cq, q = _dense(t, f"{p}.self_attn.q_proj", tokens, d, n * h, r, x)
        ck, kg = _dense(t, f"{p}.self_attn.k_proj", tokens, d, k * h, r, x)
        cv, v = _dense(t, f"{p}.self_attn.v_proj", tokens, d, k * h, r, x)
        co, o = _dense(t, f"{p}.self_attn.o_proj", tokens, n * h, d, r, q or kg or v)
        total += cq + ck + cv + _attention(half, half, q, kg, v) + co
        grad = grad or o
        x = grad or t.under(f"{p}.post_attention_layernorm")
        cg, g = _dense(t, f"{p}.mlp.gate_proj", tokens, d, f, r, x)
        cu, u = _dense(t, f"{p}.mlp.up_proj", tokens, d, f, r, x)
        cd, out = _dense(t, f"{p}.mlp.down_proj", tokens, f, d, r, g or u)
        total += cg + cu + cd
        grad = grad or out
    grad = grad or t.under("language_model.norm")
    if c.tie_word_embeddings:  # the head is the transposed embedding
        return total + 2.0 * tokens * d * c.vocab_size * (1 + t("language_model.embed_tokens") + grad)
    head = "language_model.lm_head"
    w = t(f"{head}.kernel")
    if r and t.exists(f"{head}.lora.lora_a"):  # folded into the kernel once per step: a @ b
        a, b = t(f"{head}.lora.lora_a"), t(f"{head}.lora.lora_b")
        total += 2.0 * d * r * c.vocab_size * (1 + a + b)
        w = w or a or b
    return total + 2.0 * tokens * d * c.vocab_size * (1 + w + grad)


def resolve(cfg: ModelConfig, trainable):
    """A `training.stages.TrainableSet` from a stage (preset) name or a TrainingConfig, by building the model
    abstractly (nothing allocated); a TrainableSet is returned as it is."""
    from owl_jax.training.stages import TrainableSet, resolve_trainable
    if isinstance(trainable, TrainableSet):
        return trainable
    if not isinstance(trainable, (str, TrainingConfig)):
        raise TypeError(f"expected a stage name, a TrainingConfig or a TrainableSet, got {type(trainable).__name__}")
    from flax import nnx
    from owl_jax.models.owl import build_model
    model = nnx.eval_shape(lambda: build_model(cfg))
    return resolve_trainable(model, trainable, cfg)


def step_flops(cfg: ModelConfig, trainable, *, tokens: int, seq_len: int, images: int,
               causal_halving: bool = True) -> StepFlops:
    """Model FLOPs of one optimizer step over `tokens` LLM positions (rows × seq_len) and `images` images.
    `trainable`: the trainable set (`Trainer.trainable_set`), or a TrainingConfig / stage name to resolve
    it from (a text-only stage, `lm_pretrain`, counts no images)."""
    from owl_jax.models.connectors import connector_attribute, connector_step_flops
    from owl_jax.training.stages import uses_images
    if isinstance(trainable, (str, TrainingConfig)) and not uses_images(trainable):
        images = 0
    ts = resolve(cfg, trainable)
    t = _Trainable(ts.names, ts.params)
    if not images:
        return StepFlops(llm=_llm(cfg, t, tokens, seq_len, causal_halving, visual_grad=False))
    vision, feature_grad = _vision(cfg, t)
    attr = connector_attribute(cfg)
    parts = frozenset(n.split(".")[1] for n in ts.names if n.startswith(attr + "."))
    connector = connector_step_flops(cfg, trained_parts=parts, input_grad=feature_grad)
    llm = _llm(cfg, t, tokens, seq_len, causal_halving, visual_grad=bool(parts) or feature_grad)
    return StepFlops(vision=images * vision, connector=images * connector, llm=llm)


def compiled_flops(compiled) -> float:
    """FLOPs XLA reports for a compiled executable (count scanned bodies once: compile unrolled)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0]
    return float(analysis.get("flops", 0.0))
