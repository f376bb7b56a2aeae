"""Typed configuration for owl-jax.

One `Config` object describes a whole run (model, mesh, optimizer, data, training), so a run can be
reproduced from its saved config alone. Configs are YAML files with an optional `base:` include chain and
`section.key=value` command-line overrides; every key is checked against these dataclasses so that a typo
is an error naming the key and the closest valid names rather than a silently ignored setting.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import re
import sys
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


# --------------------------------------------------------------------------------------------------
# Enumerated options: one list per field, used by validation, error messages and the docs alike
# --------------------------------------------------------------------------------------------------


def choice(default: str, *others: str):
    """A string field that takes one of a fixed set of values (`default` first).

    The choices live in the field's metadata, so validation (`enumerated_problems`), the message a typo
    gets and `python -m owl_jax.config --choices` all read the same list: what the docs show is what is
    accepted, and nothing is checked late, deep in the model or pipeline code.
    """
    return field(default=default, metadata={"choices": (default, *others)})


def field_choices(cls: type, name: str) -> tuple[str, ...]:
    """The accepted values of the enumerated field `cls.name`."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            return tuple(f.metadata["choices"])
    raise KeyError(f"{cls.__name__} has no field {name!r}")


DTYPES = ("float32", "bfloat16", "float16")


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


@dataclass
class VisionConfig:
    """CLIP ViT as mPLUG-Owl uses it (ViT-L/14 @224 by default; see DESIGN.md §2)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    # mPLUG-Owl uses 1e-6 for every LayerNorm of the tower (CLIP itself uses 1e-5).
    layer_norm_eps: float = 1e-6
    # Initial position embeddings of a tower trained from scratch (pretrained weights replace them):
    # "sincos2d" (big_vision's 2-D sine-cosine table, CLS at 0) puts position into every token's content at
    # the scale of the patch features, so attention pooling in the abstractor can keep "where"; "normal"
    # (std 0.02, HF CLIP's init) starts at ~2% of the patch signal, and a small tower trained briefly
    # never recovers it (measured on the demo world: position 98% linearly decodable from the tower's
    # tokens but 26% after the abstractor).
    position_embedding_init: str = choice("sincos2d", "normal")
    # MLP activation of the tower, as HF CLIP configs name it: quick_gelu (OpenAI CLIP, mPLUG-Owl and LLaVA's
    # towers) | gelu (exact erf GELU) | gelu_pytorch_tanh (tanh approximation).
    hidden_act: str = choice("quick_gelu", "gelu", "gelu_pytorch_tanh")
    # Which ViT (owl_jax/models/vision.py): clip (CLIP / mPLUG-Owl: patch conv without bias, `pre_layernorm`,
    # q/k/v fused per head) | blip2 (transformers `Blip2VisionModel`, EVA-style: patch conv with bias, no
    # pre-LayerNorm, one `qkv` Linear with q and v biases and none on k; BLIP-2 / InstructBLIP / MiniGPT-4,
    # with hidden_act gelu and layer_norm_eps 1e-6).
    kind: str = choice("clip", "blip2")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_positions(self) -> int:
        return self.num_patches + 1


@dataclass
class AbstractorConfig:
    """Perceiver-style visual abstractor: learned queries cross-attend to [queries ; patch features]."""

    hidden_size: int = 1024
    num_layers: int = 6
    num_heads: int = 16
    intermediate_size: int = 2816
    num_queries: int = 64
    # norm1 / normk / norm2 are torch-default LayerNorms (1e-5); ffn_ln uses layer_norm_eps (1e-6).
    norm_eps: float = 1e-5
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.1
    # The official code starts the queries at zero; we draw them from N(0, query_init_std).
    query_init_std: float = 0.02


@dataclass
class QFormerConfig:
    """BLIP-2's Q-Former (`model.connector: qformer`; transformers `Blip2QFormerModel`): learned queries through
    post-LayerNorm BERT layers that self-attend and, every `cross_attention_frequency` layers (0, f, 2f, ...),
    cross-attend to the vision features, then `language_projection` to the LLM width. Defaults: the released
    BLIP-2 / InstructBLIP / MiniGPT-4 Q-Former (bert-base sized)."""

    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    num_queries: int = 32  # `num_query_tokens`: the visual tokens per image
    cross_attention_frequency: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = choice("gelu", "gelu_pytorch_tanh", "quick_gelu")
    hidden_dropout: float = 0.1  # `hidden_dropout_prob`: embeddings and every sub-layer output, in training
    attention_dropout: float = 0.1  # `attention_probs_dropout_prob`
    # InstructBLIP: the Q-Former also reads the instruction (the batch's `qformer_tokens`, BERT token ids) with
    # its own word and position embeddings and a text feed-forward path; only the query outputs go on.
    text_input: bool = False
    vocab_size: int = 30522  # the Q-Former's (BERT) vocabulary; used when text_input
    max_position_embeddings: int = 512
    # Instruction tokens per image the pipeline gives the Q-Former (`qformer_tokens` [images, max_text_len],
    # padded with -1; LAVIS InstructBLIP truncates at 128); the FLOP count assumes this length.
    max_text_len: int = 128
    # LAVIS draws the queries from N(0, 0.02) (transformers starts them at zero).
    query_init_std: float = 0.02


@dataclass
class RopeScalingConfig:
    """llama3-style RoPE frequency scaling. `type: none` disables it."""

    type: str = choice("none", "llama3", "linear")
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass
class TextConfig:
    """LLaMA decoder with Hugging Face `LlamaForCausalLM` semantics."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    # Grouped-query attention: fewer key/value heads than query heads. 0 means "same as num_heads".
    num_kv_heads: int = 0
    # 0 means hidden_size // num_heads.
    head_dim: int = 0
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads


@dataclass
class LoRAConfig:
    """LoRA adapters on Linear layers whose path matches one of `targets` (regular expressions)."""

    rank: int = 0  # 0 = no adapters
    alpha: float = 32.0
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: [r"language_model\..*\.(q_proj|v_proj)$"])


@dataclass
class ModelConfig:
    """The composite: vision encoder -> connector -> LLM (DESIGN.md §6)."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    abstractor: AbstractorConfig = field(default_factory=AbstractorConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    text: TextConfig = field(default_factory=TextConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    # What turns vision features into LLM-width visual tokens (owl_jax/models/connectors/): abstractor
    # (mPLUG-Owl: model.abstractor.*) | linear | mlp{N}x_gelu | identity (LLaVA's mm_projector_type; linear =
    # mlp1x_gelu, LLaVA-1.5 is mlp2x_gelu; identity needs vision width = LLM width).
    connector: str = "abstractor"
    # The vision hidden states the connector reads, indexed as HF `hidden_states` (0 = embeddings after the
    # pre-LayerNorm, i = after layer i, negative from the end: -1 = last layer, -2 = LLaVA's
    # mm_vision_select_layer); a list concatenates those layers on the feature axis (as transformers does).
    # null: the connector's default (abstractor -1, the others -2).
    vision_feature_layer: int | list[int] | None = None
    # default (drop CLS: LLaVA's `patch`) | full (keep CLS); "": the connector's (abstractor full, others default).
    vision_feature_select_strategy: str = choice("", "default", "full")
    # Vision post-LayerNorm on the selected hidden states; null: the connector's default (abstractor true, as
    # mPLUG-Owl post-norms all tokens; the others false: HF CLIP / LLaVA have no LayerNorm there).
    vision_feature_post_layernorm: bool | None = None
    # Biases on the projector's Linear layers (HF llava `multimodal_projector_bias`; LLaVA always has them).
    projector_bias: bool = True
    # The `<image>` token id of the llava-hf layout (`image_token_index`; set by its import). owl-jax itself
    # marks image slots with negative ids and never embeds this one; -1: a llava-hf export uses the last
    # vocabulary id.
    image_token_index: int = -1
    # Compute dtype of matmuls/activations; norms and softmax always run in float32.
    dtype: str = choice(*DTYPES)
    # Storage dtype of parameters (trainable master copies should stay float32).
    param_dtype: str = choice(*DTYPES)
    # Storage dtype for frozen parameters; empty = param_dtype. bfloat16 halves their memory.
    frozen_param_dtype: str = choice("", *DTYPES)
    # Rematerialisation policy per layer.
    remat_policy: str = choice("none", "full", "dots", "dots_no_batch")
    # Stack layers and run them with a scan (faster compiles for deep models).
    scan_layers: bool = False
    # Attention kernel (owl_jax.models.layers.attention): xla = owl-jax's own (plain batched matmuls,
    # FlashAttention's backward; every backend, attention dropout included) | cudnn = jax.nn's fused GPU
    # kernel (LLaMA and the vision tower; no dropout) | splash = on TPU, the LLM's causal attention in the
    # Pallas splash kernel (tiles in VMEM, skips the masked tiles; data.seq_len a multiple of 128), the
    # rest in the XLA path; other backends run the XLA path throughout.
    attention_impl: str = choice("xla", "cudnn", "splash")
    # Tokens per chunk of the vocabulary projection in the loss (0 = all at once).
    loss_chunk_size: int = 1024

    @property
    def tokens_per_image(self) -> int:
        """Visual tokens spliced per image, as the connector makes them (abstractor: queries + `vit_eos`;
        projectors: one per selected vision token, e.g. 576 for CLIP-L/14 at 336 px without CLS)."""
        from owl_jax.models.connectors import tokens_per_image  # the model package owns the arithmetic
        return tokens_per_image(self)


# --------------------------------------------------------------------------------------------------
# Mesh, optimizer, data, training
# --------------------------------------------------------------------------------------------------


def _default_axis_rules() -> list[list]:
    # Logical axis name -> mesh axes (None = replicated), in the spirit of MaxText's logical_axis_rules.
    return [
        ["batch", ["data", "fsdp"]],
        ["embed", "fsdp"],
        ["vision_embed", "fsdp"],
        ["mlp", "tensor"],
        ["heads", "tensor"],
        ["kv_heads", "tensor"],
        ["head_dim", None],
        ["vocab", "tensor"],
        ["qkv", None],
        ["norm", None],
        ["layers", None],
        ["queries", None],
        ["lora_rank", None],
        ["patch", None],
        ["positions", None],
    ]


@dataclass
class MeshConfig:
    """Device mesh (`data`, `fsdp`, `tensor`); one axis may be -1 = all remaining devices."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    # Multi-slice TPU: the data-parallel degree across slices (over DCN).
    dcn_data: int = 1
    logical_axis_rules: list[list] = field(default_factory=_default_axis_rules)


@dataclass
class ParamGroupConfig:
    """One learning-rate group: the trainable leaves whose user-facing path (`projector.linear_1.kernel`,
    `language_model.layers.0.self_attn.q_proj.lora.lora_a`) matches one of `patterns` (regular expressions,
    searched) train at peak `learning_rate`, with the warmup and decay of `optimizer.learning_rate`."""

    name: str = ""  # shown in the metrics (`learning_rate/<name>`) and the optimizer state
    patterns: list[str] = field(default_factory=list)
    learning_rate: float = 0.0


@dataclass
class OptimizerConfig:
    learning_rate: float = 1e-4
    schedule: str = choice("cosine", "linear", "constant")
    warmup_steps: int = 0
    decay_steps: int = 0  # 0 = training.steps
    end_learning_rate_ratio: float = 0.0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_clip_norm: float = 1.0
    # Trainable leaves with their own peak learning rate (owl_jax/training/optimizer.py), e.g. LLaVA-LoRA's
    # projector at 2e-5 beside the adapters at 2e-4; the first group whose pattern matches a leaf takes it,
    # the rest follow `learning_rate`. Logged per group as `learning_rate/<name>`.
    param_groups: list[ParamGroupConfig] = field(default_factory=list)
    # The older spelling (kept working): path regex -> multiplier of `learning_rate`, e.g. {"vision_model": 0.1}.
    lr_multipliers: dict[str, float] = field(default_factory=dict)


@dataclass
class SourceConfig:
    """One instruction source of the stage-2 mixture."""

    name: str = ""
    path: str = ""
    # The record format (data_pipelines.conversation.READERS; mplug_owl = official, vicuna = sharegpt).
    # cc_sbu_align: MiniGPT-4's stage-2 `filter_cap.json` (path; images `image/<image_id>.jpg` beside it).
    format: str = choice("llava", "official", "mplug_owl", "alpaca", "sharegpt", "vicuna", "baize", "cc_sbu_align")
    weight: float = 0.0  # 0 = proportional to the source's size
    image_root: str = ""  # relative image paths are resolved against this


@dataclass
class DataConfig:
    # captions: webdataset caption shards (train_paths); instructions / text: instruction sources (sources),
    # text for text-only LLM pretraining (training.stage lm_pretrain).
    kind: str = choice("captions", "instructions", "text")
    # Caption shards (stage 1): local paths, brace patterns, fsspec URLs or `pipe:` commands.
    train_paths: list[str] = field(default_factory=list)
    eval_paths: list[str] = field(default_factory=list)
    # Instruction sources (stage 2 / text pretraining).
    sources: list[SourceConfig] = field(default_factory=list)
    eval_sources: list[SourceConfig] = field(default_factory=list)
    tokenizer: str = ""
    seq_len: int = 2048
    global_batch_size: int = 256
    # Fixed number of image slots per global batch (static shapes).
    images_per_batch: int = 256
    packing: bool = False
    shuffle: bool = True
    # Shards whose samples are shuffled together (random access by tar index: no streaming buffer).
    shuffle_shards: int = 8
    # Caption prompt: text around the caption; `<image>` marks the image slot; loss on the caption only.
    caption_template: str = "<image>{caption}"
    # The conversation template of instruction data, generation prompts, evaluation and serving, with its
    # stop strings (data_pipelines/templates.py): mplug_owl (official `Human: ` / `AI: `), plain (LLaVA
    # stage 1: image, caption), vicuna_v1 (LLaVA-1.5: `USER: ... ASSISTANT: ...</s>`), llava_llama_2,
    # minigpt4 (`###Human: <Img><image></Img> q ###Assistant: a###`), instructblip (image, BOS, q, a</s>).
    template: str = choice("mplug_owl", "plain", "vicuna_v1", "llava_llama_2", "minigpt4", "instructblip")
    # The system prompt of the conversation template (instruction data, evaluation, chat). None: the
    # template's own (mplug_owl: the official prompt, ~110 LLaMA tokens). "" drops it: conversations start
    # at "Human: ", which shortens sequences a lot for small models. A record's own system message always wins.
    system_prompt: str | None = None
    # InstructBLIP (`model.qformer.text_input`): the Q-Former's BERT WordPiece tokenizer (a `tokenizer.json`
    # or `vocab.txt`, or a directory holding one) for the batch's `qformer_tokens` (each image's instruction).
    qformer_tokenizer: str = ""
    # Training augmentation of caption images: random resized crop (scale 0.5-1) and horizontal flip.
    augment: bool = True
    hflip: bool = True
    # Stop with an error when more than this fraction of samples had to be skipped (after 200 samples).
    max_skip_fraction: float = 0.1
    # Images with more pixels are skipped as `decompression_bomb` (checked from the header, before
    # decoding); raise it for real photos above ~90 MP (the default is PIL's own warning threshold).
    max_pixels: int = 89_478_485
    num_workers: int = 4
    prefetch: int = 64  # samples decoded ahead per process
    cache_dir: str = ""  # where remote / pipe: shards are fetched to (default: the system temp dir)
    seed: int = 0


@dataclass
class TrainingConfig:
    # The named trainable set (owl_jax/training/stages.py PRESETS, each with the recipe it comes from):
    # owl_stage1 (vision + abstractor), owl_stage2_lora (LoRA only: the released mPLUG-Owl code),
    # owl_stage2_paper (LoRA + abstractor: the paper), llava_stage1 (projector), llava_stage2 (projector +
    # LLM), llava_lora (LoRA + projector), minigpt4 (the Q-Former's language_projection only: MiniGPT-4's
    # llama_proj, both stages), blip2_stage2 / instructblip (Q-Former + its queries + language_projection; ViT
    # and LLM frozen), and the first release's names: pretrain (the connector's stage 1:
    # owl_stage1 or llava_stage1), instruct_lora (LoRA), instruct_full (LLM), lm_pretrain (LLM, text-only
    # batches: the one stage without images).
    stage: str = choice("pretrain", "instruct_lora", "instruct_full", "lm_pretrain", "owl_stage1", "owl_stage2_lora",
                        "owl_stage2_paper", "llava_stage1", "llava_stage2", "llava_lora", "minigpt4",
                        "blip2_stage2", "instructblip")
    # Path patterns of the trainable parameters, replacing the stage's preset (which then only says whether
    # batches carry images): regular expressions searched in user-facing parameter paths
    # (`language_model.layers.0.self_attn.q_proj.kernel`, `projector.linear_1.bias`; scanned stacks have no
    # layer index). A leaf trains if some pattern matches it and no `!`-prefixed pattern does; a pattern that
    # matches nothing is an error. Everything else is frozen: no gradient, no optimizer state.
    trainable: list[str] = field(default_factory=list)
    steps: int = 1000
    grad_accum_steps: int = 1
    seed: int = 0
    output_dir: str = "runs/default"
    log_every: int = 10
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    eval_every: int = 0
    eval_batches: int = 4
    # Steps with a non-finite loss/gradient are skipped; this many in a row stop the run.
    max_consecutive_nonfinite: int = 5


@dataclass
class InitConfig:
    """Where the weights of a new run come from (a resumed run always uses its own checkpoint)."""

    from_checkpoint: str = ""  # an earlier stage's run directory (or one of its step directories)
    owl_from: str = ""  # official mPLUG-Owl / exported HF directory
    vision_from: str = ""  # HF CLIPVisionModel / CLIPModel directory
    llm_from: str = ""  # HF LlamaForCausalLM directory
    # LLaVA weights: a llava-hf `LlavaForConditionalGeneration` directory (current or legacy keys), an original
    # LLaVA repository checkpoint (LLM + `model.mm_projector.*`; the tower comes from vision_from) or a stage-1
    # `mm_projector.bin` (the projector alone). Applied after vision_from / llm_from.
    llava_from: str = ""
    # BLIP-2 / InstructBLIP weights (`model.connector: qformer`): a transformers `Blip2ForConditionalGeneration` or
    # `InstructBlipForConditionalGeneration` directory (`convert/blip2.py`). A checkpoint whose language model is
    # not LLaMA (OPT, Flan-T5) gives the tower, the queries and the Q-Former only (MiniGPT-4 takes those of
    # blip2-flan-t5-xxl, its LLM from llm_from). Applied after vision_from / llm_from.
    blip2_from: str = ""
    # A MiniGPT-4 stage checkpoint (`.pth`, `{"model": {"llama_proj.weight", "llama_proj.bias"}, ...}`): the
    # projection into the LLM (`qformer.language_projection`), applied after blip2_from.
    minigpt4_from: str = ""


@dataclass
class LoggingConfig:
    progress: bool = True  # a progress line on process 0
    tensorboard: bool = True
    wandb_project: str = ""  # set to log to Weights & Biases (needs `pip install wandb`)
    wandb_run_name: str = ""
    # Every process records the samples of each step in <output_dir>/samples/process-<i>.jsonl (an audit
    # of what the run trained on: no sample twice or skipped across preemptions and process-count changes).
    sample_log: bool = False


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    init: InitConfig = field(default_factory=InitConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def to_dict(config) -> dict:
    """Plain nested dict of a config dataclass (for YAML/JSON dumps)."""
    return dataclasses.asdict(config)


# --------------------------------------------------------------------------------------------------
# Loading: YAML files with `base:` includes, command-line overrides, typed conversion, validation
# --------------------------------------------------------------------------------------------------

class ConfigError(Exception):
    """A mistake in a config file or override. The message is complete on its own (shown without traceback)."""


# YAML 1.1 (PyYAML) wants a dot in a float (`1.0e-4`), so `learning_rate: 1e-4` would load as the string
# '1e-4' and fail the type check. This resolver also accepts the dot-less exponent form.
_FLOAT_TAG = "tag:yaml.org,2002:float"
_FLOAT_PATTERN = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that reads `1e-4` as a float (subclassed so that `yaml.SafeLoader` itself stays untouched)."""


class _YamlDumper(yaml.SafeDumper):
    """SafeDumper that quotes strings like '1e-4' (which `_YamlLoader` would read back as floats) and writes
    lists of scalars on one line, keeping dumps short but mappings in readable block style."""


_YamlLoader.add_implicit_resolver(_FLOAT_TAG, _FLOAT_PATTERN, list("-+0123456789."))
_YamlDumper.add_implicit_resolver(_FLOAT_TAG, _FLOAT_PATTERN, list("-+0123456789."))


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    """Flow style (`[a, b]`) only for lists of scalars, so axis rules and path lists stay one line each."""
    flow = all(not isinstance(item, (list, dict)) for item in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_YamlDumper.add_representer(list, _represent_list)


def _parse_yaml(text: str, source: str) -> Any:
    """Parse YAML text, turning syntax errors into a ConfigError that names where the text came from."""
    try:
        return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise ConfigError(f"invalid YAML in {source}: {e}") from None


# ---- files and includes ----------------------------------------------------------------------------


def _read_yaml_file(path: Path, included_by: Path | None) -> dict:
    """Read one YAML file as a mapping (an empty file is an empty mapping)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        if included_by is None:
            raise ConfigError(f"config file not found: {str(path)!r}") from None
        raise ConfigError(f"base file not found: {str(path)!r} (included from {str(included_by)!r})") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {str(path)!r}: {e.strerror or e}") from None
    data = _parse_yaml(text, repr(str(path)))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must contain a mapping at top level, got {_describe(data)}")
    return data


def _base_paths(data: dict, path: Path) -> list[Path]:
    """The files named by a file's `base:` key, resolved relative to that file's directory."""
    base = data.pop("base", None)
    if base is None:
        return []
    names = [base] if isinstance(base, str) else base
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise ConfigError(f"'base' in {str(path)!r} must be a file name or a list of file names, got {_describe(base)}")
    return [path.parent / os.path.expanduser(n) for n in names]


def _load_tree(path: Path, chain: tuple[Path, ...] = (), included_by: Path | None = None) -> dict:
    """Load a file and its `base:` chain (recursively) into one merged dict; `chain` detects include cycles."""
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(str(p) for p in (*chain[chain.index(resolved):], resolved))
        raise ConfigError(f"include cycle in 'base:' files: {cycle}")
    data = _read_yaml_file(path, included_by)
    merged: dict = {}
    for base_path in _base_paths(data, path):
        merged = _deep_merge(merged, _load_tree(base_path, (*chain, resolved), included_by=path))
    return _deep_merge(merged, data)


def _deep_merge(base: dict, update: dict) -> dict:
    """Merge `update` over `base`: mappings merge recursively, lists and scalars replace.

    An empty (null) value over a mapping keeps the mapping, so a section header left empty in a child file
    (`model:` with everything commented out) does not wipe what the base file set.
    """
    out = dict(base)
    for key, value in update.items():
        old = out.get(key)
        if isinstance(old, dict) and isinstance(value, dict):
            out[key] = _deep_merge(old, value)
        elif isinstance(old, dict) and value is None:
            continue
        else:
            out[key] = value
    return out


# ---- overrides ---------------------------------------------------------------------------------------


def _parse_override(text: str) -> tuple[list[str], Any]:
    """Split `a.b.c=value` into its key path and the YAML-parsed value."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep:
        raise ConfigError(f"malformed override {text!r}: expected section.key=value")
    parts = key.split(".")
    if not key or any(not p.strip() for p in parts):
        raise ConfigError(f"malformed override {text!r}: the key must be dotted names like model.text.num_layers")
    return [p.strip() for p in parts], _parse_yaml(raw, f"override {text!r}")


def _apply_override(tree: dict, keys: list[str], value: Any) -> None:
    """Set `tree[k1][k2]...[kn] = value`, creating (or replacing non-mapping) intermediate levels."""
    node = tree
    for key in keys[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[keys[-1]] = value


# ---- typed conversion ----------------------------------------------------------------------------------


def _describe(value: Any) -> str:
    """`str 'four'`-style description of a received value for error messages."""
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{type(value).__name__} {text}"


def _type_name(tp: Any) -> str:
    """Readable name of a field's annotated type (`int`, `list[str]`, `dict[str, float]`, `int or null`)."""
    if dataclasses.is_dataclass(tp):
        return f"a mapping (section {tp.__name__})"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if _is_optional(tp):
        inner = [a for a in args if a is not type(None)]
        return " or ".join(_type_name(a) for a in inner) + " or null"
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]" if args else origin.__name__
    return getattr(tp, "__name__", str(tp))


def _is_optional(tp: Any) -> bool:
    """True for `Optional[X]` and `X | None` alike (both spellings may appear in annotations)."""
    origin = typing.get_origin(tp)
    return origin in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


def _join(section: str, key: str) -> str:
    """Dotted name of `key` inside `section` (the top level has an empty section name)."""
    return f"{section}.{key}" if section else key


def _convert(tp: Any, value: Any, key: str) -> Any:
    """Check/convert one value against an annotated type; `key` is the dotted name used in errors."""
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if tp is Any:
        return value
    if _is_optional(tp):
        if value is None:
            return None
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return _convert(inner[0] if len(inner) == 1 else typing.Union[tuple(inner)], value, key)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        for option in args:
            try:
                return _convert(option, value, key)
            except ConfigError:
                pass
        raise _type_error(key, tp, value)
    if tp is list or origin is list:
        return _convert_list(tp, args, value, key)
    if tp is dict or origin is dict:
        return _convert_dict(tp, args, value, key)
    return _convert_scalar(tp, value, key)


def _type_error(key: str, tp: Any, value: Any) -> ConfigError:
    """One wording for every type mismatch: `key: expected T, got type value`."""
    return ConfigError(f"{key}: expected {_type_name(tp)}, got {_describe(value)}")


def _convert_scalar(tp: Any, value: Any, key: str) -> Any:
    """int / float / bool / str, strictly: bools are not numbers, and an int field takes no fractional float."""
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(tp, type):
        if isinstance(value, tp):
            return value
    else:
        return value  # an annotation we do not model: take the value as given
    raise _type_error(key, tp, value)


def _convert_list(tp: Any, args: tuple, value: Any, key: str) -> list:
    """Lists of a typed item (`list[str]`) are checked item by item; a bare `list` item is taken as given."""
    if not isinstance(value, list):
        raise _type_error(key, tp, value)
    if not args:
        return list(value)
    return [_convert(args[0], item, f"{key}[{i}]") for i, item in enumerate(value)]


def _convert_dict(tp: Any, args: tuple, value: Any, key: str) -> dict:
    """Mappings with string keys; values checked against the annotated value type."""
    if not isinstance(value, dict):
        raise _type_error(key, tp, value)
    if not args:
        return dict(value)
    key_type, value_type = args
    return {
        _convert(key_type, k, f"{key} (key {k!r})"): _convert(value_type, v, _join(key, str(k)))
        for k, v in value.items()
    }


def _unknown_key_error(cls: type, key: str, section: str) -> ConfigError:
    """Name the dotted key, its section, the closest valid names and every valid name."""
    valid = [f.name for f in dataclasses.fields(cls)]
    where = f"in section {section!r}" if section else "at top level"
    close = difflib.get_close_matches(str(key), valid, n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else "."
    return ConfigError(f"unknown key {_join(section, str(key))!r} {where}{hint} Valid keys: {', '.join(valid)}")


def from_dict(cls: type, data: Any, section: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, checking every key and value; missing keys keep defaults.

    `section` is the dotted name of `data` (empty at top level) so that errors name the full key.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        name = f"section {section!r}" if section else "the config"
        raise ConfigError(f"{name} must be a mapping of keys to values, got {_describe(data)}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise _unknown_key_error(cls, key, section)
        kwargs[key] = _convert(hints[key], value, _join(section, key))
    return cls(**kwargs)


# ---- validation ----------------------------------------------------------------------------------------

def enumerated_problems(obj: Any, section: str = "") -> list[str]:
    """Every enumerated field (declared with `choice`) of `obj` and its sub-sections, lists of sections
    included (`data.sources[0].format`), whose value is not one of its choices."""
    p: list[str] = []
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), _join(section, f.name)
        if "choices" in f.metadata:
            _check_choice(p, key, value, f.metadata["choices"])
        elif dataclasses.is_dataclass(value):
            p += enumerated_problems(value, key)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    p += enumerated_problems(item, f"{key}[{i}]")
    return p


def _check_choice(problems: list[str], key: str, value: str, choices: Sequence[str]) -> None:
    """String options are free-form in the dataclasses; catch typos here instead of deep in the model code."""
    if value not in choices:
        shown = ", ".join(repr(c) if c == "" else c for c in choices)
        close = difflib.get_close_matches(str(value), [c for c in choices if c], n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        problems.append(f"{key}: {value!r} is not one of {shown}{hint}")


def _check_positive(problems: list[str], section: str, obj: Any, names: Sequence[str]) -> None:
    """Sizes that must be >= 1 (zero would give empty arrays or divisions by zero later)."""
    for name in names:
        if getattr(obj, name) < 1:
            problems.append(f"{section}.{name} must be >= 1, got {getattr(obj, name)}")


def _check_regexes(problems: list[str], key: str, patterns: Sequence[str]) -> None:
    """Path regexes are compiled only when parameters are matched; report a bad one at load time instead."""
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as e:
            problems.append(f"{key}: invalid regular expression {pattern!r}: {e}")


def _divisibility_problems(v: VisionConfig, a: AbstractorConfig, t: TextConfig) -> list[str]:
    """Head/patch splits that must come out even (connector widths: `models.connectors.connector_problems`)."""
    p: list[str] = []
    if v.image_size % v.patch_size:
        p.append(f"model.vision.image_size ({v.image_size}) must be divisible by patch_size ({v.patch_size})")
    if v.hidden_size % v.num_heads:
        p.append(f"model.vision.hidden_size ({v.hidden_size}) must be divisible by num_heads ({v.num_heads})")
    if a.hidden_size % a.num_heads:
        p.append(f"model.abstractor.hidden_size ({a.hidden_size}) must be divisible by num_heads ({a.num_heads})")
    if t.head_dim == 0 and t.hidden_size % t.num_heads:
        p.append(
            f"model.text.hidden_size ({t.hidden_size}) must be divisible by num_heads ({t.num_heads}) "
            "when head_dim is 0"
        )
    if t.num_heads % t.kv_heads:
        p.append(f"model.text.num_heads ({t.num_heads}) must be divisible by num_kv_heads ({t.kv_heads})")
    return p


# `model.connector` is open-ended (mlp{N}x_gelu for any N), so it is checked here rather than by `choice`.
_CONNECTORS = ("abstractor", "linear", "mlp{N}x_gelu", "identity", "qformer")


def _connector_problems(m: ModelConfig) -> list[str]:
    """The connector name (mlp{N}x_gelu for any N >= 1), the feature selection and the widths it must fit."""
    p: list[str] = []
    name = "mlp{N}x_gelu" if re.fullmatch(r"mlp[1-9][0-9]*x_gelu", m.connector) else m.connector
    _check_choice(p, "model.connector", name, _CONNECTORS)
    layers = m.vision_feature_layer
    layers = [layers] if isinstance(layers, int) else layers
    n = m.vision.num_layers
    if layers is not None:
        if not layers:
            p.append("model.vision_feature_layer: an empty list selects no features")
        bad = [i for i in layers if not -(n + 1) <= i <= n]
        if bad:
            p.append(f"model.vision_feature_layer {bad} out of range for a {n}-layer tower (0..{n} or -{n + 1}..-1)")
    if p:
        return p
    from owl_jax.models.connectors import connector_problems  # widths each connector needs
    return connector_problems(m)


def _model_problems(m: ModelConfig) -> list[str]:
    """Shape and option checks that would otherwise fail deep inside model init or at trace time."""
    p: list[str] = []
    v, a, t = m.vision, m.abstractor, m.text
    _check_positive(p, "model.vision", v, ("hidden_size", "num_layers", "num_heads", "image_size", "patch_size"))
    _check_positive(p, "model.abstractor", a, ("hidden_size", "num_layers", "num_heads", "num_queries"))
    _check_positive(p, "model.text", t, ("vocab_size", "hidden_size", "num_layers", "num_heads"))
    if t.head_dim < 0 or t.num_kv_heads < 0:
        p.append("model.text.head_dim and model.text.num_kv_heads must be >= 0 (0 = derived)")
    if not p:  # the divisibility checks divide by these sizes
        p += _divisibility_problems(v, a, t)
    if m.vision.position_embedding_init == "sincos2d" and m.vision.hidden_size % 4:
        p.append(f"model.vision.position_embedding_init: sincos2d needs hidden_size divisible by 4, "
                 f"got {m.vision.hidden_size}")
    p += _connector_problems(m)
    if m.loss_chunk_size < 0:
        p.append(f"model.loss_chunk_size must be >= 0, got {m.loss_chunk_size}")
    if m.lora.rank < 0:
        p.append(f"model.lora.rank must be >= 0, got {m.lora.rank}")
    _check_regexes(p, "model.lora.targets", m.lora.targets)
    return p


def _mesh_problems(mesh: MeshConfig) -> list[str]:
    """At most one axis may be -1 (= the remaining devices); every other axis is an explicit size >= 1."""
    p: list[str] = []
    axes = {"data": mesh.data, "fsdp": mesh.fsdp, "tensor": mesh.tensor}
    wildcards = [name for name, size in axes.items() if size == -1]
    if len(wildcards) > 1:
        p.append(f"mesh: at most one of data/fsdp/tensor may be -1, got -1 for {', '.join(wildcards)}")
    for name, size in axes.items():
        if size != -1 and size < 1:
            p.append(f"mesh.{name} must be >= 1 or -1 (all remaining devices), got {size}")
    if mesh.dcn_data < 1:
        p.append(f"mesh.dcn_data must be >= 1, got {mesh.dcn_data}")
    return p


def _param_group_problems(o: OptimizerConfig) -> list[str]:
    """Named, distinct groups with patterns and a positive rate (matching them against the trainable leaves
    needs the model: `owl_jax.training.optimizer.check_param_groups`)."""
    p: list[str] = []
    if o.param_groups and o.lr_multipliers:
        p.append("optimizer: give learning-rate groups as param_groups or as the older lr_multipliers, not both")
    seen: set[str] = set()
    for i, g in enumerate(o.param_groups):
        key = f"optimizer.param_groups[{i}]"
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", g.name) or g.name == "default":
            p.append(f"{key}.name: {g.name!r} must be a non-empty name of letters, digits, '_', '.', '-' "
                     f"(and not 'default', the leaves no group takes)")
        elif g.name in seen:
            p.append(f"{key}.name: {g.name!r} names two groups")
        seen.add(g.name)
        if not g.patterns:
            p.append(f"{key}.patterns: empty (give the parameter path patterns of the group)")
        _check_regexes(p, f"{key}.patterns", g.patterns)
        if not g.learning_rate > 0:
            p.append(f"{key}.learning_rate must be > 0, got {g.learning_rate} (freeze parameters with "
                     f"training.trainable instead)")
    return p


def _run_problems(config: Config) -> list[str]:
    """Optimizer, data and training options."""
    p: list[str] = []
    _check_regexes(p, "optimizer.lr_multipliers", list(config.optimizer.lr_multipliers))
    trainable = config.training.trainable
    _check_regexes(p, "training.trainable", [t[1:] if t.startswith("!") else t for t in trainable])
    if any(t in ("", "!") for t in trainable):
        p.append("training.trainable: an empty pattern (it would match every parameter)")
    elif trainable and all(t.startswith("!") for t in trainable):
        p.append("training.trainable: only '!' patterns (exclusions); give the patterns of what trains")
    p += _param_group_problems(config.optimizer)
    _check_positive(p, "data", config.data, ("seq_len", "global_batch_size"))
    _check_positive(p, "training", config.training, ("grad_accum_steps",))
    if config.model.attention_impl == "splash" and config.data.seq_len % 128:
        p.append(f"model.attention_impl=splash tiles the LLM's rows in blocks of 128 tokens: data.seq_len must be "
                 f"a multiple of 128, got {config.data.seq_len}")
    return p


def validate(config: Config) -> Config:
    """Semantic checks across fields; raises one ConfigError listing every problem found. Returns `config`."""
    problems = (enumerated_problems(config) + _model_problems(config.model) + _mesh_problems(config.mesh)
                + _run_problems(config))
    if len(problems) == 1:
        raise ConfigError(f"invalid config: {problems[0]}")
    if problems:
        raise ConfigError("invalid config:\n" + "\n".join(f"  - {x}" for x in problems))
    return config


# ---- public entry points -------------------------------------------------------------------------------


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> Config:
    """Load a YAML config with its `base:` chain, apply `key=value` overrides, type-check and validate it."""
    if isinstance(overrides, str):
        raise TypeError("overrides must be a sequence of 'key=value' strings, not a single string")
    tree = _load_tree(Path(path))
    for text in overrides:
        keys, value = _parse_override(text)
        _apply_override(tree, keys, value)
    return validate(from_dict(Config, tree))


def config_from_dict(d: dict) -> Config:
    """Typed, validated Config from a plain dict such as the one `dump_config`/`to_dict` saved with a run."""
    return validate(from_dict(Config, d))


def dump_config(config: Config) -> str:
    """YAML text of a resolved config; loading it back gives an equal Config."""
    return yaml.dump(to_dict(config), Dumper=_YamlDumper, sort_keys=False, default_flow_style=False, width=120)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m owl_jax.config --config FILE [key=value ...]`: print the resolved config as YAML."""
    parser = argparse.ArgumentParser(prog="python -m owl_jax.config", description=main.__doc__)
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides, e.g. model.text.num_layers=4")
    parser.add_argument("--choices", action="store_true",
                        help="also list every enumerated key with its accepted values (after the YAML, as comments)")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(dump_config(config))
    if args.choices:
        sys.stdout.write("# enumerated keys and their accepted values:\n")
        for key, choices in enumerated_fields(Config):
            sys.stdout.write(f"#   {key}: {' | '.join(repr(c) if c == '' else c for c in choices)}\n")
    return 0


def enumerated_fields(cls: type = None, section: str = "") -> list[tuple[str, tuple[str, ...]]]:
    """(dotted key, choices) of every enumerated field of `cls` (default `Config`) and its sections."""
    cls = Config if cls is None else cls
    out: list[tuple[str, tuple[str, ...]]] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = _join(section, f.name)
        if "choices" in f.metadata:
            out.append((key, tuple(f.metadata["choices"])))
            continue
        tp = hints[f.name]
        args = typing.get_args(tp)
        if dataclasses.is_dataclass(tp):
            out += enumerated_fields(tp, key)
        elif typing.get_origin(tp) is list and args and dataclasses.is_dataclass(args[0]):
            out += enumerated_fields(args[0], f"{key}[]")
    return out


if __name__ == "__main__":
    sys.exit(main())
