"""LLaMA weights in Hugging Face `LlamaForCausalLM` layout (also the `language_model.*` part of the
official mPLUG-Owl checkpoint)."""

from __future__ import annotations

from owl_jax.config import TextConfig
from owl_jax.convert.keymap import TensorRule, layer_norm, linear

LM = "language_model"
STACK = f"{LM}.layers.layers"
# Non-parameter buffers that some checkpoints (transformers < 4.31) store; regenerated from the config.
IGNORED_BUFFERS = ("rotary_emb.inv_freq",)


def llama_rules(cfg: TextConfig) -> list[TensorRule]:
    rules = [TensorRule("model.embed_tokens.weight", f"{LM}.embed_tokens"),
             *layer_norm("model.norm", f"{LM}.norm", bias=False)]
    if not cfg.tie_word_embeddings:
        rules += linear("lm_head", f"{LM}.lm_head", bias=False)
    for i in range(cfg.num_layers):
        k, s = f"model.layers.{i}", f"{STACK}.{i}"
        rules += [*layer_norm(f"{k}.input_layernorm", f"{s}.input_layernorm", bias=False),
                  *layer_norm(f"{k}.post_attention_layernorm", f"{s}.post_attention_layernorm", bias=False)]
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            rules += linear(f"{k}.self_attn.{name}", f"{s}.self_attn.{name}", bias=False)
        for name in ("gate_proj", "up_proj", "down_proj"):
            rules += linear(f"{k}.mlp.{name}", f"{s}.mlp.{name}", bias=False)
    return rules
