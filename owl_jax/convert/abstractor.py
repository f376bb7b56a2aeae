"""Visual abstractor weights in the official mPLUG-Owl layout (`abstractor.*` and `query_tokens`)."""

from __future__ import annotations

from owl_jax.config import AbstractorConfig
from owl_jax.convert.keymap import TensorRule, layer_norm, linear, reshape_to

ABS = "abstractor"
STACK = f"{ABS}.layers.layers"


def abstractor_rules(cfg: AbstractorConfig, llm_hidden: int) -> list[TensorRule]:
    """Official keys (with their `abstractor.` / `query_tokens` top level) <-> owl-jax paths."""
    q, d = cfg.num_queries, cfg.hidden_size
    rules = [
        TensorRule("query_tokens", f"{ABS}.query_tokens", reshape_to((q, d)), reshape_to((1, q, d))),
        TensorRule("abstractor.vit_eos", f"{ABS}.vit_eos", reshape_to((llm_hidden,)),
                   reshape_to((1, 1, llm_hidden))),
        *linear("abstractor.visual_fc", f"{ABS}.visual_fc", bias=True),
    ]
    for i in range(cfg.num_layers):
        k, s = f"abstractor.encoder.layers.{i}.crossattention", f"{STACK}.{i}"
        rules += [*layer_norm(f"{k}.norm1", f"{s}.norm1"), *layer_norm(f"{k}.normk", f"{s}.normk")]
        for name in ("query", "key", "value"):
            rules += linear(f"{k}.attention.{name}", f"{s}.attention.{name}", bias=True)
        rules += [*linear(f"{k}.output.out_proj", f"{s}.out_proj", bias=True),
                  *layer_norm(f"{k}.output.norm2", f"{s}.norm2"),
                  *layer_norm(f"{k}.output.mlp.ffn_ln", f"{s}.mlp.ffn_ln")]
        for name in ("w1", "w2", "w3"):
            rules += linear(f"{k}.output.mlp.{name}", f"{s}.mlp.{name}", bias=True)
    return rules
