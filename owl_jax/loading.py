"""One entry point for inference (generation, chat, evaluation): a model, its config and its tokenizer from
an owl-jax training run or from a Hugging Face directory.

Accepted paths:
  - a training run directory (`RUN/checkpoints/...`, latest step) or one step directory
    `RUN/checkpoints/STEP`: config and tokenizer come from the checkpoint (see `checkpoint.load_run`);
  - an official mPLUG-Owl layout directory (`config.json` with `model_type: mplug-owl` + safetensors or
    `.bin` weights), e.g. the golden checkpoint or `python -m owl_jax.export --format mplug-owl`;
  - a `LlamaForCausalLM` directory (`model_type: llama`): the language model alone, for text-only
    generation (the vision tower is a minimal placeholder, and images are refused);
  - a llava-hf directory (`LlavaForConditionalGeneration`: `model_type: llava` with `text_config` /
    `vision_config`), e.g. `python -m owl_jax.export --format llava-hf` or a hub `llava-hf/...` checkpoint;
  - an original LLaVA repository checkpoint (`LlavaLlamaForCausalLM`: a LLaMA config with `mm_vision_tower`,
    `mm_projector_type`, ...), whose vision tower is the HF CLIP directory `mm_vision_tower` names: a local
    path (absolute, or relative to the checkpoint directory; a hub name must be downloaded and the config
    pointed at it).

Hugging Face directories take their tokenizer from the directory (`tokenizer.json` / `tokenizer.model`)
unless one is given, and the conversation template of their family (`FAMILY_TEMPLATES`: LLaVA's `vicuna_v1`
for both LLaVA layouts; a run keeps its own `data.template`; `template=` overrides either). A PEFT LoRA adapter directory can be applied on top (`lora=`), unmerged or merged.
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
    kind: str  # run | mplug-owl | hf-llama | llava-hf | llava-original | blip2-hf | instructblip-hf
    has_vision: bool


#: The conversation template (`data.template`) a Hugging Face directory of each kind is prompted in.
FAMILY_TEMPLATES = {"mplug-owl": "mplug_owl", "hf-llama": "mplug_owl", "llava-hf": "vicuna_v1",
                    "llava-original": "vicuna_v1", "blip2-hf": "instructblip", "instructblip-hf": "instructblip"}


#: The vision side of a text-only (`hf-llama`) model: tiny, never run on a real image.
_PLACEHOLDER_VISION = VisionConfig(hidden_size=8, intermediate_size=8, num_layers=1, num_heads=1, image_size=14,
                                   patch_size=14, position_embedding_init="normal")
_PLACEHOLDER_ABSTRACTOR = AbstractorConfig(hidden_size=8, num_layers=1, num_heads=1, intermediate_size=8,
                                           num_queries=1)


def checkpoint_kind(path: str | os.PathLike) -> str:
    """run | mplug-owl | hf-llama | llava-hf | llava-original | blip2-hf | instructblip-hf for a loadable path, else LoadError saying what
    the path is not."""
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
        c = json.loads(config.read_text())
        model_type = c.get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise LoadError(f"{config} is not a readable config: {e}") from None
    if model_type in ("mplug-owl", "mplug_owl"):
        return "mplug-owl"
    if any(k in c for k in ("mm_vision_tower", "mm_projector_type", "mm_hidden_size")):
        return "llava-original"
    if model_type == "llava":
        return "llava-hf"
    if model_type in ("blip-2", "instructblip"):  # Blip2 / InstructBlipForConditionalGeneration
        return "blip2-hf" if model_type == "blip-2" else "instructblip-hf"
    if model_type == "llama":
        return "hf-llama"
    raise LoadError(f"{config}: model_type {model_type!r} is not an mPLUG-Owl, LLaVA, BLIP-2 or LLaMA checkpoint")


def model_name(path: str | os.PathLike) -> str:
    """A name for the model at `path`, for `model_id` in answers: the directory's name, and for one step
    directory of a run (`RUN/checkpoints/12`) the run's name and step (`RUN-step12`), not the bare step
    number. A run directory (its latest step) is just the run's name."""
    p = Path(os.path.abspath(path))
    if p.parent.name == "checkpoints" and p.name.isdigit():
        return f"{p.parent.parent.name}-step{int(p.name)}"
    return p.name


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


def _vision_tower(path: Path, c: dict) -> Path:
    """The HF CLIP directory an original LLaVA config names (`mm_vision_tower`), or LoadError."""
    name = c.get("mm_vision_tower") or c.get("vision_tower")
    if not isinstance(name, str) or not name:
        raise LoadError(f"{path / 'config.json'}: an original LLaVA config without mm_vision_tower")
    for candidate in (Path(name), path / name):
        if (candidate / "config.json").is_file():
            return candidate
    raise LoadError(f"{path} is an original LLaVA checkpoint whose vision tower {name!r} is not a local "
                    f"directory; download that CLIP model and set mm_vision_tower in {path / 'config.json'} to "
                    f"its path")


def _llava_original_config(path: Path) -> tuple[ModelConfig, Path]:
    from owl_jax.convert.llava import original_llava_settings
    from owl_jax.convert.mplug_owl import text_config_from_hf, vision_config_from_hf
    c = json.loads((path / "config.json").read_text())
    tower = _vision_tower(path, c)
    t = json.loads((tower / "config.json").read_text())
    t = t.get("vision_config", t)  # a full CLIPModel config holds the tower's under vision_config
    vision = dataclasses.replace(vision_config_from_hf(t), hidden_act=t.get("hidden_act", "quick_gelu"),
                                 layer_norm_eps=t.get("layer_norm_eps", 1e-5))
    return ModelConfig(vision=vision, text=text_config_from_hf(c), **original_llava_settings(c)), tower


def _from_hf(path: Path, kind: str, lora: Path | None, scan_layers: bool) -> tuple[Config, nnx.Module]:
    from owl_jax.convert import io, llava
    from owl_jax.convert.keymap import CheckpointMismatchError
    from owl_jax.convert.mplug_owl import (load_hf_clip_vision, load_hf_llama, load_official, load_peft_lora,
                                           read_official_config, text_config_from_hf)
    from owl_jax.convert.state import StateMismatchError
    from owl_jax.convert import blip2
    if lora and kind not in ("mplug-owl", "hf-llama"):
        raise LoadError(f"--lora applies to mPLUG-Owl and LLaMA directories, not {kind} ones (merge the adapters "
                        f"before exporting)")
    tower = None
    try:
        if kind == "mplug-owl":
            model_cfg = read_official_config(path)
        elif kind == "llava-hf":
            model_cfg = llava.read_llava_config(path)
        elif kind == "llava-original":
            model_cfg, tower = _llava_original_config(path)
        elif kind in ("blip2-hf", "instructblip-hf"):
            model_cfg = blip2.read_blip2_config(path)
        else:
            text = text_config_from_hf(json.loads((path / "config.json").read_text()))
            model_cfg = ModelConfig(vision=_PLACEHOLDER_VISION, abstractor=_PLACEHOLDER_ABSTRACTOR, text=text)
    except (KeyError, TypeError, ValueError, CheckpointMismatchError, io.WeightFileError) as e:
        raise LoadError(f"{path / 'config.json'} is not a usable {kind} config ({type(e).__name__}: {e})") from None
    model_cfg = dataclasses.replace(model_cfg, lora=_adapter_lora(lora) if lora else LoRAConfig(),
                                    scan_layers=scan_layers)
    model = _allocate(model_cfg)
    try:
        if kind in ("blip2-hf", "instructblip-hf"):
            blip2.load_blip2_checked(model, model_cfg, path)
        elif kind.startswith("llava"):
            if tower is not None:
                load_hf_clip_vision(model, model_cfg, tower)
            llava.load_llava_checked(model, model_cfg, path)
        else:
            (load_official if kind == "mplug-owl" else load_hf_llama)(model, model_cfg, path)
        if lora:
            load_peft_lora(model, model_cfg, lora, layout=kind)
    except (CheckpointMismatchError, StateMismatchError, io.WeightFileError) as e:
        raise LoadError(f"cannot load {path}: {str(e).splitlines()[0]}") from None
    data = DataConfig(tokenizer=str(path), seq_len=model_cfg.text.max_position_embeddings,
                      template=FAMILY_TEMPLATES[kind])
    return Config(model=model_cfg, data=data), model


def load_for_inference(path: str | os.PathLike, *, tokenizer: str | None = None, lora: str | None = None,
                       merge_lora: bool = False, scan_layers: bool = False, template: str | None = None,
                       require_tokenizer: bool = True, qformer_tokenizer: str | None = None) -> Loaded:
    """The model (eval mode) of a training run or HF directory; see the module docstring.

    `tokenizer` overrides the checkpoint's (e.g. `toy:512`); `lora` is a PEFT adapter directory for a HF
    directory (runs carry their own adapters); `merge_lora` folds every adapter into its kernel (in
    float32) instead of applying it unmerged at each step. `scan_layers` stacks the layers of a model read
    from a HF directory (one traced layer: faster compiles for deep models; runs keep their own layout).
    `template` overrides the conversation template (`data.template`). Without `require_tokenizer`, a
    checkpoint without a loadable tokenizer gives `tokenizer=None` (tools that feed token ids themselves).
    A model whose Q-Former reads the instruction (InstructBLIP) also needs its WordPiece tokenizer:
    `qformer_tokenizer`, else the run's `data.qformer_tokenizer`, else the HF directory's own
    (`qformer_tokenizer/`, as `InstructBlipProcessor` saves it); it is checked here, so that chat sessions
    (`ChatSession.for_config`) find it in `config.data.qformer_tokenizer`.
    """
    if template is not None:
        from data_pipelines.templates import get_template
        try:
            get_template(template)
        except ValueError as e:
            raise LoadError(str(e)) from None
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
        spec = tokenizer or cfg.data.tokenizer
    else:
        cfg, model = _from_hf(Path(path), kind, lora_dir, scan_layers)
        spec = tokenizer or path
    try:
        tok = _tokenizer(spec, str(path))
    except LoadError:
        if require_tokenizer:
            raise
        tok = None
    if tokenizer:
        cfg.data.tokenizer = tokenizer
    if template is not None:
        cfg.data.template = template
    _check_qformer_tokenizer(cfg, qformer_tokenizer, path, kind, required=require_tokenizer)
    if tok is not None and tok.vocab_size > cfg.model.text.vocab_size:
        raise LoadError(f"the tokenizer has {tok.vocab_size} tokens but the model only {cfg.model.text.vocab_size}")
    if merge_lora:
        from owl_jax.export import merge_adapters
        merge_adapters(model)
    model.eval()
    return Loaded(config=cfg, model=model, tokenizer=tok, kind=kind, has_vision=kind != "hf-llama")


def _check_qformer_tokenizer(cfg: Config, override: str | None, path, kind: str, *, required: bool) -> None:
    """Point `cfg.data.qformer_tokenizer` at a loadable Q-Former tokenizer when the model reads instructions
    (LoadError naming the option otherwise; tools that feed ids themselves pass `required=False`)."""
    from owl_jax.config import ConfigError
    from owl_jax.data import qformer_tokenizer_for, reads_instructions
    if not reads_instructions(cfg):
        return
    if override:
        cfg.data.qformer_tokenizer = str(override)
    elif kind != "run":
        cfg.data.qformer_tokenizer = str(path)
    try:
        qformer_tokenizer_for(cfg)
    except ConfigError as e:
        if required:
            raise LoadError(f"{path}: the model's Q-Former reads the instruction and needs its tokenizer "
                            f"(pass --qformer-tokenizer): {e}") from None
        cfg.data.qformer_tokenizer = ""
