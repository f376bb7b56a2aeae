"""`python -m owl_jax.export --checkpoint RUN_DIR[/checkpoints/STEP] --format FORMAT --out DIR [options]`

Writes a training run's model (the latest step, or the given step) as a PyTorch-side checkpoint directory:

  mplug-owl       the official mPLUG-Owl HF layout (`query_tokens`, `vision_model.*`, `abstractor.*`,
                  `language_model.*`, rotary buffers as the release stores them), `config.json` in the
                  official schema, `generation_config.json` (the official demo's sampling defaults), tokenizer;
  hf-llama        the language model as a `LlamaForCausalLM` directory (config, generation config, tokenizer);
  peft-lora       the LoRA adapters as a PEFT directory (`adapter_config.json`, `adapter_model.safetensors`)
                  for the official layout (`--layout mplug-owl`) or a `LlamaForCausalLM` base (`--layout hf-llama`,
                  whose base is this run's `hf-llama --base-only` export);
  hf-clip-vision  the vision tower as a `CLIPVisionModel` directory with `preprocessor_config.json`;
  llava-hf        a LLaVA-connector model as a `LlavaForConditionalGeneration` directory (config, processor
                  and preprocessor configs, generation config, tokenizer);
  blip2-hf / instructblip-hf
                  a Q-Former model as a `Blip2ForConditionalGeneration` / `InstructBlipForConditionalGeneration`
                  directory (`vision_model.*`, `query_tokens`, `qformer.*`, `language_projection.*`,
                  `language_model.*`; config, processor and preprocessor configs, generation config, tokenizer).

Weights are safetensors, bfloat16 unless `--dtype float32`, in shards with a `model.safetensors.index.json`
above `--max-shard-size`. A run with LoRA adapters in the exported part needs `--merge-lora` (fold them
into the weights, in float32) or `--base-only` (the frozen base; export the adapters with `peft-lora`), so
that adapters are never dropped silently. The conversion itself lives in `owl_jax.convert`; this module
checks the request, orchestrates and writes files. User mistakes exit 2 with one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Sequence

import ml_dtypes
import numpy as np
from flax import nnx

from owl_jax.config import Config, ModelConfig
from owl_jax.convert import hf_configs, io, mplug_owl
from owl_jax.convert.keymap import CheckpointMismatchError
from owl_jax.convert.llama import llama_rules
from owl_jax.convert.state import canonical_shapes

FORMATS = ("mplug-owl", "hf-llama", "peft-lora", "hf-clip-vision", "llava-hf", "blip2-hf", "instructblip-hf")
DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32}
DEFAULT_MAX_SHARD_SIZE = "5GB"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
# The part of the model each format exports (canonical path prefix; "" = everything).
_PART = {"mplug-owl": "", "hf-llama": "language_model.", "hf-clip-vision": "vision_model.", "peft-lora": "",
         "llava-hf": "", "blip2-hf": "", "instructblip-hf": ""}
# Files an earlier export may have left that would shadow or contradict a new one (removed by --force).
_STALE = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json",
          "adapter_model.bin")


class ExportError(Exception):
    """A request that cannot be exported as asked; the message says what to change."""


def parse_size(text: str) -> int:
    """`5GB` (decimal, as Hugging Face counts), `500MiB`, `50KB` or a byte count -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ExportError(f"--max-shard-size {text!r} is not a size like 5GB, 500MB or 2GiB")
    unit = (m[2] or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    size = int(float(m[1]) * scale)
    if size <= 0:
        raise ExportError(f"--max-shard-size must be positive, got {text!r}")
    return size


# ------------------------------------------------------------------------------------------------
# LoRA handling
# ------------------------------------------------------------------------------------------------


def adapted_layers(model: nnx.Module, prefix: str = "") -> list[str]:
    """Paths (as users write them in `model.lora.targets`) of the Dense layers under `prefix` that carry a
    LoRA adapter."""
    from owl_jax.models.layers import user_path
    return sorted({user_path(p.split(".lora.")[0]) for p in canonical_shapes(model)
                   if ".lora." in p and p.startswith(prefix)})


def merge_adapters(model: nnx.Module) -> list[str]:
    """Fold every LoRA adapter into its kernel. Kernels are first raised to float32 (frozen kernels may be
    stored in bf16, which would round the small update away); the export casts once, at the end."""
    from owl_jax.models.layers import Dense, merge_lora
    for _, module in nnx.iter_graph(model):
        if isinstance(module, Dense) and module.lora is not None:
            module.kernel.set_value(module.kernel[...].astype(np.float32))
    return merge_lora(model)


def _resolve_lora(model: nnx.Module, fmt: str, *, merge_lora: bool, base_only: bool) -> None:
    if merge_lora and base_only:
        raise ExportError("--merge-lora and --base-only contradict each other; pass one")
    adapted = adapted_layers(model, _PART[fmt])
    if fmt == "peft-lora":
        if merge_lora or base_only:
            raise ExportError("--merge-lora / --base-only do not apply to --format peft-lora (it exports the "
                              "adapters themselves)")
        if not adapted:
            raise ExportError("the run has no LoRA adapters to export (model.lora.rank is 0, or its targets "
                              "matched nothing); export the weights with --format mplug-owl or hf-llama")
        return
    if adapted and not (merge_lora or base_only):
        raise ExportError(f"the run has LoRA adapters on {len(adapted)} layers of the exported part (e.g. "
                          f"{adapted[0]}): pass --merge-lora to fold them into the weights, or --base-only to "
                          f"export the frozen base (and the adapters with --format peft-lora)")
    if merge_lora:
        merge_adapters(model)


# ------------------------------------------------------------------------------------------------
# Tensors and files
# ------------------------------------------------------------------------------------------------


def _cast(tensors: dict[str, np.ndarray], dtype) -> dict[str, np.ndarray]:
    """Floating tensors to the export dtype; rotary `inv_freq` buffers stay float32 as the release has
    them (they are recomputed on load anyway)."""
    out = {}
    for key, x in tensors.items():
        x = np.asarray(x)
        if np.issubdtype(x.dtype, np.floating) or x.dtype == ml_dtypes.bfloat16:
            if "rotary_emb.inv_freq" not in key:
                x = x.astype(dtype)
        out[key] = x
    return out


def _adapter_modules(tensors: dict[str, np.ndarray]) -> list[str]:
    prefix, suffixes = "base_model.model.", (".lora_A.weight", ".lora_B.weight")
    return sorted({k[len(prefix):-len(s)] for k in tensors for s in suffixes if k.endswith(s)})


def export_files(model: nnx.Module, cfg: ModelConfig, fmt: str, *, dtype: str = "bfloat16",
                 layout: str = "mplug-owl") -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    """(tensors, {json file name: content}) of one export, LoRA already resolved (see `export_model`)."""
    target = DTYPES[dtype]
    if fmt == "mplug-owl":
        tensors = mplug_owl.export_official(model, cfg)
        configs = {"config.json": hf_configs.official_config(cfg, dtype=dtype),
                   "generation_config.json": hf_configs.generation_config(cfg.text, official_demo=True)}
    elif fmt == "hf-llama":
        tensors = mplug_owl.export_hf_llama(model, cfg)
        configs = {"config.json": hf_configs.llama_config(cfg.text, dtype=dtype),
                   "generation_config.json": hf_configs.generation_config(cfg.text)}
    elif fmt == "llava-hf":
        from owl_jax.convert import llava
        try:
            tensors = llava.export_llava_hf(model, cfg)
        except CheckpointMismatchError as e:
            raise ExportError(f"cannot export as llava-hf: {e}") from None
        configs = {"config.json": llava.llava_hf_config(cfg, dtype=dtype),
                   "generation_config.json": hf_configs.generation_config(cfg.text), **llava.processor_files(cfg)}
    elif fmt in ("blip2-hf", "instructblip-hf"):
        from owl_jax.convert import blip2
        try:
            tensors = blip2.export_blip2_hf(model, cfg, fmt)
        except CheckpointMismatchError as e:
            raise ExportError(f"cannot export as {fmt}: {e}") from None
        configs = {"config.json": blip2.blip2_hf_config(cfg, fmt, dtype=dtype),
                   "generation_config.json": hf_configs.generation_config(cfg.text), **blip2.processor_files(cfg, fmt)}
    elif fmt == "hf-clip-vision":
        tensors = mplug_owl.export_hf_clip_vision(model, cfg, with_prefix=True)
        configs = {"config.json": hf_configs.clip_vision_config(cfg.vision, dtype=dtype),
                   "preprocessor_config.json": hf_configs.clip_image_processor_config(cfg.vision)}
    elif fmt == "peft-lora":
        if layout not in ("mplug-owl", "hf-llama"):
            raise ExportError(f"--layout {layout!r} is not one of mplug-owl, hf-llama")
        try:
            tensors = mplug_owl.export_peft_lora(model, cfg, layout=layout)
        except CheckpointMismatchError as e:
            raise ExportError(f"cannot export the adapters for the {layout} layout: {e}") from None
        base = mplug_owl.official_rules(cfg) if layout == "mplug-owl" else llama_rules(cfg.text)
        configs = {"adapter_config.json": hf_configs.peft_adapter_config(cfg, _adapter_modules(tensors), base,
                                                                        layout=layout)}
    else:
        raise ExportError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return _cast(tensors, target), configs


def export_model(model: nnx.Module, cfg: ModelConfig, out: str | Path, fmt: str, *, dtype: str = "bfloat16",
                 merge_lora: bool = False, base_only: bool = False, layout: str = "mplug-owl",
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                 tokenizer: str | None = None, legacy_adapter_bin: bool = False,
                 qformer_tokenizer: str | None = None) -> list[Path]:
    """Write `model` to the directory `out` (created; files of the same names are overwritten) in `fmt`.
    `--merge-lora` modifies `model` in place. `tokenizer`: the run's tokenizer file or directory, copied
    along (None or a built-in name like `toy:512`: nothing to copy). `legacy_adapter_bin` (peft-lora) also
    writes `adapter_model.bin` for peft < 0.5. `qformer_tokenizer` (instructblip-hf): the Q-Former's
    WordPiece tokenizer, copied to `qformer_tokenizer/` as `InstructBlipProcessor.save_pretrained` lays it
    out, so the export is complete for `owl_jax.generate` and transformers alike. Returns the files written."""
    if legacy_adapter_bin and fmt != "peft-lora":
        raise ExportError("--legacy-adapter-bin applies to --format peft-lora only")
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    _resolve_lora(model, fmt, merge_lora=merge_lora, base_only=base_only)
    tokenizer_files = find_tokenizer_files(tokenizer) if fmt != "hf-clip-vision" else {}
    qformer_files = _qformer_tokenizer_files(qformer_tokenizer) if fmt == "instructblip-hf" else {}
    tensors, configs = export_files(model, cfg, fmt, dtype=dtype, layout=layout)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "peft-lora":
        io.save_safetensors(tensors, out / "adapter_model.safetensors", {"format": "pt"})
        written = [out / "adapter_model.safetensors"]
        if legacy_adapter_bin:
            written.append(save_torch_state_dict(tensors, out / "adapter_model.bin"))
    else:
        written = io.save_safetensors_checkpoint(tensors, out, max_shard_bytes=max_shard_bytes)
    for name, content in configs.items():
        (out / name).write_text(json.dumps(content, indent=2) + "\n")
        written.append(out / name)
    written += copy_tokenizer(tokenizer_files, out, cfg)
    if qformer_files:
        (out / "qformer_tokenizer").mkdir(exist_ok=True)
        for name, f in qformer_files.items():
            shutil.copyfile(f, out / "qformer_tokenizer" / name)
            written.append(out / "qformer_tokenizer" / name)
    return written


def _qformer_tokenizer_files(spec: str | None) -> dict[str, Path]:
    """{name: file} of a Q-Former tokenizer: a `tokenizer.json` / `vocab.txt` file, or the files of a
    directory (or of its `qformer_tokenizer/`, as transformers saves a processor)."""
    if not spec:
        return {}
    src = Path(spec)
    if src.is_dir() and (src / "qformer_tokenizer").is_dir():
        src = src / "qformer_tokenizer"
    if src.is_dir():
        return {f.name: f for f in sorted(src.iterdir()) if f.is_file()}
    if src.is_file():  # named as BertTokenizer(Fast) and WordPieceTokenizer look for it
        return {{".json": "tokenizer.json", ".txt": "vocab.txt"}.get(src.suffix, src.name): src}
    raise ExportError(f"the run's data.qformer_tokenizer {spec!r} no longer exists")


def save_torch_state_dict(tensors: dict[str, np.ndarray], path: Path) -> Path:
    """A plain `{key: torch.Tensor}` state dict written with `torch.save`: the `adapter_model.bin` that
    peft before 0.5 loads (peft 0.3.x, which the official mPLUG-Owl code was used with, looks for no
    safetensors file). Only tensors, so `torch.load(path, weights_only=True)` reads it; torch is imported
    here because only this legacy file needs it."""
    try:
        import torch
    except ImportError:
        raise ExportError("--legacy-adapter-bin needs PyTorch (pip install torch==2.13.0)") from None
    state = {}
    for key in sorted(tensors):
        arr = np.ascontiguousarray(tensors[key])
        if arr.dtype.name == "bfloat16":  # numpy has no bfloat16 torch understands: move the bits
            state[key] = torch.from_numpy(arr.view(np.uint16).astype(np.int16)).view(torch.bfloat16).clone()
        else:
            state[key] = torch.from_numpy(arr.copy())
    torch.save(state, path)
    return path


def find_tokenizer_files(tokenizer: str | None) -> dict[str, Path]:
    """{name in the export: file} of the run's tokenizer (a file, or every file of a directory). A lone
    SentencePiece model is named `tokenizer.model` (what `LlamaTokenizer` looks for), a lone HF tokenizer
    file `tokenizer.json`. Built-in tokenizers (`toy:512`) have no files."""
    if not tokenizer or ":" in tokenizer and not Path(tokenizer).exists():
        return {}
    src = Path(tokenizer)
    if src.is_dir():
        return {f.name: f for f in sorted(src.iterdir()) if f.is_file()}
    if src.is_file():
        return {{".model": "tokenizer.model", ".json": "tokenizer.json"}.get(src.suffix, src.name): src}
    raise ExportError(f"the run's tokenizer {tokenizer!r} no longer exists (and the checkpoint has no copy)")


def copy_tokenizer(files: dict[str, Path], out: Path, cfg: ModelConfig) -> list[Path]:
    """Copy the tokenizer files into `out`; without a `tokenizer_config.json`, a SentencePiece model gets
    one naming `LlamaTokenizer` and the model's special pieces, so that `AutoTokenizer.from_pretrained(out)`
    works."""
    written = []
    for name, f in files.items():
        shutil.copyfile(f, out / name)
        written.append(out / name)
    if "tokenizer_config.json" not in files and "tokenizer.model" in files:
        (out / "tokenizer_config.json").write_text(
            json.dumps(_sentencepiece_tokenizer_config(out / "tokenizer.model", cfg), indent=2) + "\n")
        written.append(out / "tokenizer_config.json")
    return written


def _sentencepiece_tokenizer_config(path: Path, cfg: ModelConfig) -> dict:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    sp.Load(str(path))

    def piece(i: int) -> str | None:
        return sp.id_to_piece(i) if i >= 0 else None

    return {"tokenizer_class": "LlamaTokenizer", "bos_token": piece(sp.bos_id()), "eos_token": piece(sp.eos_id()),
            "unk_token": piece(sp.unk_id()), "pad_token": piece(sp.pad_id()), "add_bos_token": True,
            "add_eos_token": False, "legacy": True, "model_max_length": cfg.text.max_position_embeddings,
            "clean_up_tokenization_spaces": False}


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def _prepare_out(out: Path, force: bool) -> None:
    from owl_jax.paths import OutputPathError, check_writable_dir
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a directory")
    try:  # a read-only target or a file on the way fails here, before the checkpoint is read
        check_writable_dir(out, "--out", create=False)
    except OutputPathError as e:
        raise ExportError(str(e)) from None
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise ExportError(f"--out {out} exists and is not empty; choose a new directory or pass --force "
                              "(which replaces the weight files there)")
        for pattern in _STALE:
            for f in out.glob(pattern):
                f.unlink()


def _load(checkpoint: str) -> tuple[Config, nnx.Module]:
    from owl_jax.checkpoint import CheckpointError, load_run
    try:
        return load_run(checkpoint)
    except CheckpointError as e:
        hint = ""
        if (Path(checkpoint) / "config.json").is_file():
            hint = (" — it looks like a Hugging Face checkpoint directory; export reads owl-jax training runs "
                    "(import HF weights with init.owl_from / init.llm_from / init.vision_from)")
        raise ExportError(f"{e}{hint}") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m owl_jax.export", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="training run directory or RUN/checkpoints/STEP")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--out", required=True, help="output directory (new, or empty, or with --force)")
    parser.add_argument("--dtype", default="bfloat16", choices=list(DTYPES), help="weight dtype (default bfloat16)")
    lora = parser.add_mutually_exclusive_group()
    lora.add_argument("--merge-lora", action="store_true", help="fold LoRA adapters into the weights")
    lora.add_argument("--base-only", action="store_true", help="export the base weights without the adapters")
    parser.add_argument("--layout", default="mplug-owl", choices=("mplug-owl", "hf-llama"),
                        help="peft-lora: the base the adapter is for (default mplug-owl)")
    parser.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE,
                        help=f"largest safetensors file before sharding with an index (default {DEFAULT_MAX_SHARD_SIZE})")
    parser.add_argument("--force", action="store_true", help="write into a non-empty --out")
    parser.add_argument("--legacy-adapter-bin", action="store_true",
                        help="peft-lora: also write adapter_model.bin (a torch state dict) for peft < 0.5, e.g. the "
                             "peft 0.3 of the official mPLUG-Owl code (needs torch)")
    args = parser.parse_args(argv)

    from owl_jax.config import ConfigError
    from owl_jax.convert.state import StateMismatchError
    out = Path(args.out)
    try:
        max_shard = parse_size(args.max_shard_size)
        _prepare_out(out, args.force)
        cfg, model = _load(args.checkpoint)
        written = export_model(model, cfg.model, out, args.format, dtype=args.dtype, merge_lora=args.merge_lora,
                               base_only=args.base_only, layout=args.layout, max_shard_bytes=max_shard,
                               tokenizer=cfg.data.tokenizer, legacy_adapter_bin=args.legacy_adapter_bin,
                               qformer_tokenizer=cfg.data.qformer_tokenizer)
    except (ExportError, ConfigError, CheckpointMismatchError, StateMismatchError, io.WeightFileError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: writing the export failed: {e}", file=sys.stderr)
        return 1
    size = sum(f.stat().st_size for f in written if f.suffix == ".safetensors")
    print(f"exported {args.checkpoint} as {args.format} ({args.dtype}, {size / 2**20:.1f} MiB of weights) to {out}:")
    for f in written:
        print(f"  {f.name}")
    if args.format != "hf-clip-vision" and not any(f.name.startswith("tokenizer") for f in written):
        print(f"note: no tokenizer files (the run used {cfg.data.tokenizer!r}, which has none to copy)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
