"""One entry point for inference (generation, chat, evaluation): a model, its config and its tokenizer from
an owl-jax training run or from a Hugging Face directory.

Accepted paths:
  - a training run directory (`RUN/checkpoints/...`, latest step) or one step directory
    `RUN/checkpoints/STEP`: config and tokenizer come from the checkpoint (see `checkpoint.load_run`);
  - an official mPLUG-Owl layout directory (`config.json` with `model_type: mplug-owl` + safetensors or
    `.bin` weights), e.g. the golden checkpoint or `python -m owl_jax.export --format mplug-owl`;
  - a `LlamaForCausalLM` directory (`model_type: llama`): the language model alone, for text-only
    generation (the vision tower is a minimal placeholder, and images are refused).

Hugging Face directories take their tokenizer from the directory (`tokenizer.json` / `tokenizer.model`)
unless one is given. A PEFT LoRA adapter directory can be applied on top (`lora=`), unmerged or merged.
Everything a user can get wrong raises `LoadError` with one line that names the path.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

from flax import nnx

from owl_jax.config import AbstractorConfig, Config, DataConfig, LoRAConfig, ModelConfig, VisionConfig


class LoadError(Exception):
    """A path or option that cannot give a model; the message is one complete line."""


@dataclasses.dataclass
class Loaded:
    config: Config  # model architecture + data settings (tokenizer, system prompt, caption template, seq_len)
    model: nnx.Module
    tokenizer: object
    kind: str  # run | mplug-owl | hf-llama
    has_vision: bool


#: The vision side of a text-only (`hf-llama`) model: tiny, never run on a real image.
_PLACEHOLDER_VISION = VisionConfig(hidden_size=8, intermediate_size=8, num_layers=1, num_heads=1, image_size=14,
                                   patch_size=14, position_embedding_init="normal")
_PLACEHOLDER_ABSTRACTOR = AbstractorConfig(hidden_size=8, num_layers=1, num_heads=1, intermediate_size=8,
                                           num_queries=1)


def checkpoint_kind(path: str | os.PathLike) -> str:
    """run | mplug-owl | hf-llama for a loadable path, else LoadError saying what the path is not."""
    p = Path(path)
    if not p.exists():
        raise LoadError(f"{path} does not exist")
    if (p / "checkpoints").is_dir() or (p.parent.name == "checkpoints" and p.name.isdigit()):
        return "run"
    config = p / "config.json"
    if not p.is_dir() or not config.is_file():
        raise LoadError(f"{path} is neither a training run directory (with checkpoints/) nor a Hugging Face "
                        f"directory with config.json")
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise LoadError(f"{config} is not a readable config: {e}") from None
    if model_type in ("mplug-owl", "mplug_owl"):
        return "mplug-owl"
    if model_type == "llama":
        return "hf-llama"
    raise LoadError(f"{config}: model_type {model_type!r} is neither an mPLUG-Owl nor a LLaMA checkpoint")


def _tokenizer(spec: str | os.PathLike, what: str):
    from data_pipelines.tokenizers import load_tokenizer
    try:
        return load_tokenizer(spec)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise LoadError(f"cannot load the tokenizer of {what}: {e}" + (
            " (pass --tokenizer)" if isinstance(e, FileNotFoundError) else "")) from None


def _adapter_lora(adapter: Path) -> LoRAConfig:
    """LoRA settings that make `build_model` create exactly the adapted layers of a PEFT adapter."""
    from owl_jax.convert import io
    cfg_path = adapter / "adapter_config.json"
    if not cfg_path.is_file():
        raise LoadError(f"{adapter}: no adapter_config.json (is this a PEFT adapter directory?)")
    acfg = json.loads(cfg_path.read_text())
    try:
        keys = list(io.load_tensors(adapter))
    except (io.WeightFileError, OSError, ValueError) as e:
        raise LoadError(f"{adapter}: cannot read the adapter weights: {e}") from None
    leaves = sorted({m[1] for k in keys if (m := re.search(r"\.(\w+)\.lora_[AB]", k))})
    if not leaves:
        raise LoadError(f"{adapter}: no LoRA weights (lora_A / lora_B) in the adapter")
    return LoRAConfig(rank=int(acfg["r"]), alpha=float(acfg["lora_alpha"]), dropout=0.0,
                      targets=[rf"language_model\..*\.({'|'.join(leaves)})$"])


def _allocate(cfg: ModelConfig) -> nnx.Module:
    """The model with zeroed parameters, for weights that are about to be loaded: no random initialisation
    (minutes and a second copy of the weights for a 7B model). The loaders check that every parameter they
    are responsible for is set; only the placeholder vision side of a text-only model stays zero."""
    import jax
    import numpy as np
    from owl_jax.models.owl import build_model
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build_model(cfg)))

    def zeros(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):  # dropout RNG keys (unused in eval mode)
            return jax.random.wrap_key_data(np.zeros(x.shape + (2,), np.uint32))
        return jax.device_put(np.zeros(x.shape, x.dtype))

    return nnx.merge(graphdef, jax.tree.map(zeros, abstract))


def _from_hf(path: Path, kind: str, lora: Path | None, scan_layers: bool) -> tuple[Config, nnx.Module]:
    from owl_jax.convert import io
    from owl_jax.convert.keymap import CheckpointMismatchError
    from owl_jax.convert.mplug_owl import (load_hf_llama, load_official, load_peft_lora, read_official_config,
                                           text_config_from_hf)
    from owl_jax.convert.state import StateMismatchError
    try:
        if kind == "mplug-owl":
            model_cfg = read_official_config(path)
        else:
            text = text_config_from_hf(json.loads((path / "config.json").read_text()))
            model_cfg = ModelConfig(vision=_PLACEHOLDER_VISION, abstractor=_PLACEHOLDER_ABSTRACTOR, text=text)
    except (KeyError, TypeError, CheckpointMismatchError, io.WeightFileError) as e:
        raise LoadError(f"{path / 'config.json'} is not a usable {kind} config ({type(e).__name__}: {e})") from None
    model_cfg = dataclasses.replace(model_cfg, lora=_adapter_lora(lora) if lora else LoRAConfig(),
                                    scan_layers=scan_layers)
    model = _allocate(model_cfg)
    try:
        (load_official if kind == "mplug-owl" else load_hf_llama)(model, model_cfg, path)
        if lora:
            load_peft_lora(model, model_cfg, lora, layout=kind)
    except (CheckpointMismatchError, StateMismatchError, io.WeightFileError) as e:
        raise LoadError(f"cannot load {path}: {str(e).splitlines()[0]}") from None
    data = DataConfig(tokenizer=str(path), seq_len=model_cfg.text.max_position_embeddings)
    return Config(model=model_cfg, data=data), model


def load_for_inference(path: str | os.PathLike, *, tokenizer: str | None = None, lora: str | None = None,
                       merge_lora: bool = False, scan_layers: bool = False) -> Loaded:
    """The model (eval mode) of a training run or HF directory; see the module docstring.

    `tokenizer` overrides the checkpoint's (e.g. `toy:512`); `lora` is a PEFT adapter directory for a HF
    directory (runs carry their own adapters); `merge_lora` folds every adapter into its kernel (in
    float32) instead of applying it unmerged at each step. `scan_layers` stacks the layers of a model read
    from a HF directory (one traced layer: faster compiles for deep models; runs keep their own layout).
    """
    kind = checkpoint_kind(path)
    lora_dir = Path(lora) if lora else None
    if lora_dir is not None and not lora_dir.is_dir():
        raise LoadError(f"LoRA adapter {lora} is not a directory")
    if kind == "run":
        if lora_dir is not None:
            raise LoadError("--lora applies to Hugging Face directories; a training run carries its own adapters")
        from owl_jax.checkpoint import CheckpointError, load_run
        from owl_jax.config import ConfigError
        try:
            cfg, model = load_run(path)
        except (CheckpointError, ConfigError) as e:
            raise LoadError(str(e).splitlines()[0]) from None
        tok = _tokenizer(tokenizer or cfg.data.tokenizer, str(path))
    else:
        cfg, model = _from_hf(Path(path), kind, lora_dir, scan_layers)
        tok = _tokenizer(tokenizer or path, str(path))
    if tokenizer:
        cfg.data.tokenizer = tokenizer
    if tok.vocab_size > cfg.model.text.vocab_size:
        raise LoadError(f"the tokenizer has {tok.vocab_size} tokens but the model only {cfg.model.text.vocab_size}")
    if merge_lora:
        from owl_jax.export import merge_adapters
        merge_adapters(model)
    model.eval()
    return Loaded(config=cfg, model=model, tokenizer=tok, kind=kind, has_vision=kind != "hf-llama")
