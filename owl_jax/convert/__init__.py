"""Weights to and from the PyTorch layouts of every supported family.

`IMPORTERS` is the one table the trainer reads to apply `init.*`: each entry names an `InitConfig` key and
the function that loads that kind of checkpoint into a model, in the order they apply (a later one
overwrites what an earlier one set, so e.g. `llava_from` / `blip2_from` go over `vision_from` /
`llm_from`). A new family adds a converter module and a row here, not a branch in the trainer.
"""

from __future__ import annotations

from typing import Callable


def _official(model, cfg, path, log):
    from owl_jax.convert import mplug_owl
    mplug_owl.load_official(model, cfg, path)


def _clip_vision(model, cfg, path, log):
    from owl_jax.convert import mplug_owl
    mplug_owl.load_hf_clip_vision(model, cfg, path)


def _llama(model, cfg, path, log):
    from owl_jax.convert import mplug_owl
    mplug_owl.load_hf_llama(model, cfg, path)


def _llava(model, cfg, path, log):
    from owl_jax.convert import llava
    llava.load_llava_checked(model, cfg, path, log=log)


def _blip2(model, cfg, path, log):
    from owl_jax.convert import blip2
    blip2.load_blip2_checked(model, cfg, path, log=log)


def _minigpt4(model, cfg, path, log):
    from owl_jax.convert import blip2
    n = blip2.load_minigpt4(model, cfg, path)
    log(f"initialised the projection ({n} tensors) from the MiniGPT-4 checkpoint {path}")


#: (init key, loader(model, model_config, path, log)), in the order they apply.
IMPORTERS: tuple[tuple[str, Callable], ...] = (
    ("owl_from", _official),
    ("vision_from", _clip_vision),
    ("llm_from", _llama),
    ("llava_from", _llava),
    ("blip2_from", _blip2),
    ("minigpt4_from", _minigpt4),
)
