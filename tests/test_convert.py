"""Weight conversion: exact round trips of the key maps, the safetensors reader/writer against the reference
`safetensors` package, error reporting for checkpoints that do not fit, and PEFT LoRA adapters of HF LLaMA."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import jax.numpy as jnp
from flax import nnx

from owl_jax.config import LoRAConfig
from owl_jax.convert import clip
from owl_jax.convert.io import SafetensorsFile, WeightFileError, load_tensors, save_safetensors
from owl_jax.convert.keymap import CheckpointMismatchError, params_to_tensors, tensors_to_params
from owl_jax.convert.llama import IGNORED_BUFFERS
from owl_jax.convert.mplug_owl import (load_hf_llama, load_official, load_peft_lora, official_rules,
                                       text_config_from_hf)
from owl_jax.convert.state import StateMismatchError, canonical_params
from owl_jax.models.owl import build_model
from helpers import assert_same_tensors, same_bits

# The importers raise either error class depending on the stage that notices the mismatch (checkpoint
# keys vs model parameters); both are ValueErrors.
MISMATCH = (CheckpointMismatchError, StateMismatchError)


@pytest.fixture(scope="module")
def loaded_models(official):
    """The official checkpoint loaded into an unrolled and a scanned model."""
    cfg, directory, _ = official
    models = {}
    for scan in (False, True):
        c = dataclasses.replace(cfg, scan_layers=scan)
        models[scan] = build_model(c)
        load_official(models[scan], c, directory)
    return models


# --------------------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------------------


def test_official_checkpoint_round_trip_is_exact(official):
    cfg, _, tensors = official
    rules = official_rules(cfg)
    buffers = [k for k in tensors if "rotary_emb.inv_freq" in k]
    assert len(buffers) == cfg.text.num_layers  # transformers 4.28 stored them; they are ignored on import
    params = tensors_to_params(tensors, rules, ignore=IGNORED_BUFFERS)
    back = params_to_tensors(params, rules)
    assert_same_tensors(back, {k: v for k, v in tensors.items() if k not in buffers})


def test_hf_clip_round_trip_is_exact(official):
    """official -> HF CLIP -> official and HF CLIP -> official -> HF CLIP are identities, with and without
    the `vision_model.` prefix; the HF key set is exactly a transformers CLIPVisionModel's."""
    cfg, _, tensors = official
    vision = {k[len("vision_model."):]: v for k, v in tensors.items() if k.startswith("vision_model.")}
    hf = clip.official_to_hf_clip(vision, cfg.vision)
    assert_same_tensors(clip.hf_clip_to_official(hf, cfg.vision), vision)
    assert_same_tensors(clip.hf_clip_to_official({f"vision_model.{k}": v for k, v in hf.items()}, cfg.vision), vision)
    assert_same_tensors(clip.official_to_hf_clip(clip.hf_clip_to_official(hf, cfg.vision), cfg.vision), hf)

    transformers = pytest.importorskip("transformers")
    v = cfg.vision
    reference = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.num_layers,
        num_attention_heads=v.num_heads, image_size=v.image_size, patch_size=v.patch_size))
    ref_shapes = {k: tuple(t.shape) for k, t in reference.state_dict().items()}
    assert {k: x.shape for k, x in hf.items()} == ref_shapes


@pytest.mark.parametrize("rest", [(), (7,)], ids=["bias", "weight"])
def test_interleave_split_qkv_are_inverse(rest):
    heads, d = 4, 24
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(d, *rest)).astype(np.float32) for _ in range(3))
    fused = clip.interleave_qkv(q, k, v, heads)
    assert fused.shape == (3 * d, *rest)
    # layout: rows ordered [heads, 3, head_dim]
    per_head = fused.reshape(heads, 3, d // heads, *rest)
    for j, x in enumerate((q, k, v)):
        np.testing.assert_array_equal(per_head[:, j], x.reshape(heads, d // heads, *rest))
    for got, want in zip(clip.split_qkv(fused, heads), (q, k, v)):
        assert same_bits(got, want)
    assert same_bits(clip.interleave_qkv(*clip.split_qkv(fused, heads), heads), fused)


def test_loaded_canonical_params_equal_transformed_checkpoint(official, loaded_models):
    cfg, _, tensors = official
    rules = official_rules(cfg)
    expected = {r.path: r.to_jax(tensors[r.key]) for r in rules}
    for scan, model in loaded_models.items():
        got = {k: np.asarray(v) for k, v in canonical_params(model).items()}
        assert_same_tensors(got, expected)
    # export of the loaded model is the checkpoint again, bit for bit
    exported = params_to_tensors({k: np.asarray(v) for k, v in canonical_params(loaded_models[True]).items()}, rules)
    assert_same_tensors(exported, {k: v for k, v in tensors.items() if "inv_freq" not in k})


def test_sharded_official_checkpoint_loads(official, loaded_models, tmp_path):
    """A hand-made two-shard safetensors checkpoint with its index loads like the single file."""
    cfg, _, tensors = official
    keys = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, names in shards.items():
        save_safetensors({k: tensors[k] for k in names}, tmp_path / name)
    index = {"metadata": {}, "weight_map": {k: name for name, names in shards.items() for k in names}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_same_tensors(load_tensors(tmp_path), tensors)
    model = build_model(cfg)
    load_official(model, cfg, tmp_path)
    want = canonical_params(loaded_models[False])
    got = canonical_params(model)
    assert all(same_bits(got[k], want[k]) for k in want)


# --------------------------------------------------------------------------------------------------
# safetensors reader / writer
# --------------------------------------------------------------------------------------------------


def _sample_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "f32": rng.normal(size=(3, 5)).astype(np.float32),
        "bf16": rng.normal(size=(4, 2, 3)).astype(ml_dtypes.bfloat16),
        "f16": rng.normal(size=(7,)).astype(np.float16),
        "f64": rng.normal(size=(2, 2)),
        "i64": rng.integers(-(2**40), 2**40, size=(6,)),
        "i32": rng.integers(-100, 100, size=(2, 3)).astype(np.int32),
        "i8": rng.integers(-100, 100, size=(5,)).astype(np.int8),
        "u8": rng.integers(0, 255, size=(5,)).astype(np.uint8),
        "bool": rng.random(size=(9,)) > 0.5,
        "scalar": np.asarray(3.5, np.float32),
        "empty": np.zeros((0, 4), np.float32),
        "a.nested.key": np.arange(12, dtype=np.float32).reshape(3, 4).T,  # non-contiguous input
    }


def _torch_to_numpy(t) -> np.ndarray:
    import torch

    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def test_our_safetensors_load_with_reference_package(tmp_path):
    safetensors = pytest.importorskip("safetensors")
    from safetensors.numpy import load_file as np_load
    from safetensors.torch import load_file as torch_load

    tensors = _sample_tensors()
    path = tmp_path / "ours.safetensors"
    save_safetensors(tensors, path, metadata={"format": "pt", "note": "owl-jax"})
    (header_len,) = np.frombuffer(path.read_bytes()[:8], "<u8")
    assert (8 + header_len) % 8 == 0

    assert_same_tensors(np_load(str(path)), tensors)
    pytest.importorskip("torch")
    assert_same_tensors({k: _torch_to_numpy(v) for k, v in torch_load(str(path)).items()}, tensors)
    with safetensors.safe_open(str(path), "np") as f:
        assert f.metadata() == {"format": "pt", "note": "owl-jax"}
    # and our own reader
    st = SafetensorsFile(path)
    assert st.metadata == {"format": "pt", "note": "owl-jax"}
    assert st.shape("bf16") == (4, 2, 3)
    assert_same_tensors(load_tensors(path), tensors)


def test_we_read_reference_written_safetensors(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.numpy import save_file as np_save
    from safetensors.torch import save_file as torch_save

    g = torch.Generator().manual_seed(0)
    state = {
        "w.bf16": torch.randn(5, 3, generator=g).to(torch.bfloat16),
        "w.f32": torch.randn(2, 7, generator=g),
        "w.f16": torch.randn(4, generator=g).half(),
        "ids": torch.arange(10, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
    }
    torch_save(state, str(tmp_path / "torch.safetensors"), metadata={"format": "pt"})
    got = load_tensors(tmp_path / "torch.safetensors")
    assert_same_tensors(got, {k: _torch_to_numpy(v) for k, v in state.items()})
    assert got["w.bf16"].dtype == ml_dtypes.bfloat16
    assert SafetensorsFile(tmp_path / "torch.safetensors").metadata == {"format": "pt"}

    # (the reference numpy writer stores a non-contiguous array's raw buffer, so give it C-ordered ones)
    tensors = {k: np.asarray(v, order="C") for k, v in _sample_tensors().items()}
    np_save(tensors, str(tmp_path / "numpy.safetensors"))
    assert_same_tensors(load_tensors(tmp_path / "numpy.safetensors"), tensors)


@pytest.mark.parametrize("keep", ["0", "5", "12", "header-1", "end-1", "end-30"])
def test_truncated_safetensors_is_a_weight_file_error(tmp_path, keep):
    path = tmp_path / "model.safetensors"
    save_safetensors({"a": np.arange(40, dtype=np.float32), "b": np.ones((4, 4), np.float32)}, path)
    data = path.read_bytes()
    header_end = 8 + int(np.frombuffer(data[:8], "<u8")[0])
    size = {"header-1": header_end - 1, "end-1": len(data) - 1, "end-30": len(data) - 30}.get(keep)
    path.write_bytes(data[: int(keep) if size is None else size])
    with pytest.raises(WeightFileError, match="model.safetensors"):
        load_tensors(path)
    with pytest.raises(WeightFileError):
        load_tensors(tmp_path)  # the directory form goes the same way


def test_corrupt_safetensors_headers_are_weight_file_errors(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(np.array([2**60], "<u8").tobytes() + b"{}")
    with pytest.raises(WeightFileError, match="header"):
        load_tensors(path)
    path.write_bytes(np.array([6], "<u8").tobytes() + b"not js")
    with pytest.raises(WeightFileError):
        load_tensors(path)
    header = json.dumps({"w": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}).encode()
    path.write_bytes(np.array([len(header)], "<u8").tobytes() + header + b"\0\0")
    with pytest.raises(WeightFileError, match="F8_E4M3"):
        load_tensors(path)


def test_save_safetensors_rejects_unsupported_dtype(tmp_path):
    with pytest.raises(WeightFileError, match="'c'"):
        save_safetensors({"c": np.zeros(2, np.complex64)}, tmp_path / "x.safetensors")


# --------------------------------------------------------------------------------------------------
# Errors for checkpoints that do not fit
# --------------------------------------------------------------------------------------------------


def _write_checkpoint(directory: Path, tensors: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    save_safetensors(tensors, directory / "model.safetensors")
    return directory


def _assert_load_fails_naming(model, cfg, directory, names, errors=MISMATCH):
    before = {k: np.asarray(v) for k, v in canonical_params(model).items()}
    with pytest.raises(errors) as info:
        load_official(model, cfg, directory)
    for name in names:
        assert name in str(info.value), f"{name!r} not named in: {info.value}"
    after = canonical_params(model)
    assert all(same_bits(after[k], before[k]) for k in before), "a failed load changed the model"
    return str(info.value)


def test_missing_key_is_named(official, loaded_models, tmp_path):
    cfg, _, tensors = official
    gone = ["language_model.model.layers.1.mlp.up_proj.weight", "abstractor.vit_eos"]
    _write_checkpoint(tmp_path, {k: v for k, v in tensors.items() if k not in gone})
    message = _assert_load_fails_naming(loaded_models[False], cfg, tmp_path, gone)
    assert "missing" in message


def test_unexpected_key_is_named(official, loaded_models, tmp_path):
    cfg, _, tensors = official
    extra = {"language_model.model.layers.0.self_attn.extra_proj.weight": np.zeros((2, 2), np.float32),
             "vision_model.encoder.layers.7.mlp.fc1.weight": np.zeros((2, 2), np.float32)}
    _write_checkpoint(tmp_path, {**tensors, **extra})
    message = _assert_load_fails_naming(loaded_models[False], cfg, tmp_path, list(extra))
    assert "unexpected" in message


@pytest.mark.parametrize("key", [
    "language_model.model.layers.0.self_attn.q_proj.weight",  # Linear (transposed)
    "language_model.model.embed_tokens.weight",  # identity
    "vision_model.embeddings.cls_token",  # reshaped on import
    "query_tokens",  # reshaped on import
])
@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_misshaped_tensor_is_named(official, loaded_models, tmp_path, key, scan):
    cfg, _, tensors = official
    bad = dict(tensors)
    shape = tensors[key].shape
    bad[key] = np.zeros(shape[:-1] + (shape[-1] - 1,), np.float32)
    _write_checkpoint(tmp_path, bad)
    # a message naming either the checkpoint key or the model parameter (`...q_proj.kernel`) identifies it
    stem = key.rsplit(".", 1)[0] if key.endswith(".weight") else key
    stem = stem.replace("language_model.model.", "").replace("vision_model.", "")
    c = dataclasses.replace(cfg, scan_layers=scan)
    _assert_load_fails_naming(loaded_models[scan], c, tmp_path, [stem])


def test_directory_without_weights_names_the_path(official, loaded_models, tmp_path):
    cfg, _, _ = official
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(WeightFileError, match=str(tmp_path)):
        load_official(loaded_models[False], cfg, tmp_path)
    with pytest.raises(WeightFileError, match="no-such-dir"):
        load_official(loaded_models[False], cfg, tmp_path / "no-such-dir")


def test_index_naming_missing_shard(official, loaded_models, tmp_path):
    cfg, _, tensors = official
    keys = sorted(tensors)
    save_safetensors({k: tensors[k] for k in keys[:50]}, tmp_path / "model-00001-of-00002.safetensors")
    index = {"weight_map": {k: "model-00001-of-00002.safetensors" if i < 50 else "model-00002-of-00002.safetensors"
                            for i, k in enumerate(keys)}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(WeightFileError, match="model-00002-of-00002.safetensors"):
        load_official(loaded_models[False], cfg, tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(WeightFileError, match="model.safetensors.index.json"):
        load_official(loaded_models[False], cfg, tmp_path)


def _hf_llama_tensors(tensors: dict) -> dict:
    """The official checkpoint's language model is a transformers 4.28 `LlamaForCausalLM` state dict."""
    p = "language_model."
    return {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)}


@pytest.mark.parametrize("num_layers", [1, 3])
def test_llama_checkpoint_with_other_depth_lists_keys(official, tmp_path, num_layers):
    cfg, _, tensors = official
    _write_checkpoint(tmp_path, _hf_llama_tensors(tensors))
    c = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, num_layers=num_layers))
    model = build_model(c)
    with pytest.raises(MISMATCH) as info:
        load_hf_llama(model, c, tmp_path)
    message = str(info.value)
    if num_layers == 3:  # checkpoint has layers 0, 1
        assert "missing" in message and "model.layers.2.self_attn.q_proj.weight" in message
        assert "model.layers.1." not in message
    else:
        assert "unexpected" in message and "model.layers.1.mlp.down_proj.weight" in message
        assert "rotary_emb" not in message  # the ignored buffers are not reported


def test_hf_llama_from_official_language_model(official, loaded_models, tmp_path):
    """The same LLaMA weights through load_hf_llama land where load_official puts them."""
    cfg, _, tensors = official
    _write_checkpoint(tmp_path, _hf_llama_tensors(tensors))
    model = build_model(cfg)
    load_hf_llama(model, cfg, tmp_path)
    want, got = canonical_params(loaded_models[False]), canonical_params(model)
    lm = [k for k in want if k.startswith("language_model.")]
    assert lm and all(same_bits(got[k], want[k]) for k in lm)


class _NotATensor:
    def __init__(self):
        self.payload = [1, 2, 3]


class _RunsCodeOnLoad:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_torch_load_refuses_pickled_objects(tmp_path):
    torch = pytest.importorskip("torch")
    marker = tmp_path / "code-was-executed"
    for i, obj in enumerate([_NotATensor(), _RunsCodeOnLoad(marker)]):
        directory = tmp_path / f"ckpt{i}"
        directory.mkdir()
        torch.save({"model.embed_tokens.weight": torch.zeros(2, 2), "extra": obj}, directory / "pytorch_model.bin")
        with pytest.raises(WeightFileError, match="weights_only"):
            load_tensors(directory)
    assert not marker.exists()
    # while a plain state dict (with bf16) reads fine
    state = {"a": torch.randn(3, 2).to(torch.bfloat16), "b": torch.arange(4)}
    torch.save(state, tmp_path / "ok.bin")
    assert_same_tensors(load_tensors(tmp_path / "ok.bin"), {k: _torch_to_numpy(v) for k, v in state.items()})


# --------------------------------------------------------------------------------------------------
# PEFT LoRA adapters of Hugging Face LLaMA
# --------------------------------------------------------------------------------------------------

LORA_TARGETS = [r"language_model\..*\.(q_proj|v_proj)$"]


def _randomize_(model, seed: int) -> None:
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if p.ndim == 1:  # RMSNorm scales
                p.copy_(1.0 + 0.2 * r)
            elif "embed_tokens" in name:
                p.copy_(0.5 * r)
            else:
                p.copy_(r / math.sqrt(p.shape[1]))


@nnx.jit
def _logits(model, tokens):
    return model.logits(tokens)


@pytest.fixture(scope="module")
def peft_case(official, tmp_path_factory):
    """A HF LlamaForCausalLM (the golden LLM's sizes), its checkpoint, and a saved PEFT adapter on q/v."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    cfg, _, _ = official
    t = cfg.text
    config = transformers.LlamaConfig(vocab_size=t.vocab_size, hidden_size=t.hidden_size,
                                      intermediate_size=t.intermediate_size, num_hidden_layers=t.num_layers,
                                      num_attention_heads=t.num_heads, num_key_value_heads=2, rms_norm_eps=1e-5,
                                      attn_implementation="eager")
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    _randomize_(hf, seed=1)
    base_dir = tmp_path_factory.mktemp("peft_base")
    hf.save_pretrained(base_dir)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, size=(2, 24)).astype(np.int32)
    ids = torch.from_numpy(tokens).long()
    with torch.no_grad():
        base_logits = hf(input_ids=ids).logits.numpy()

    lora = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    model = peft.get_peft_model(hf, lora).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    adapter_dir = tmp_path_factory.mktemp("peft_adapter")
    model.save_pretrained(adapter_dir)
    with torch.no_grad():
        lora_logits = model(input_ids=ids).logits.numpy()
    return dict(config=config, base_dir=base_dir, adapter_dir=adapter_dir, tokens=tokens, base_logits=base_logits,
                lora_logits=lora_logits)


def _lora_model_config(official, case, *, rank=4, alpha=16.0):
    cfg, _, _ = official
    return dataclasses.replace(cfg, text=text_config_from_hf(case["config"].to_dict()),
                               lora=LoRAConfig(rank=rank, alpha=alpha, dropout=0.05, targets=LORA_TARGETS))


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_peft_adapter_matches_peft_logits(official, peft_case, scan):
    cfg = dataclasses.replace(_lora_model_config(official, peft_case), scan_layers=scan)
    model = build_model(cfg)
    load_hf_llama(model, cfg, peft_case["base_dir"])
    load_peft_lora(model, cfg, peft_case["adapter_dir"], layout="hf-llama")
    model.eval()  # LoRA dropout (0.05 here) off
    tokens = jnp.asarray(peft_case["tokens"])
    logits = np.asarray(_logits(model, tokens))
    err = float(np.abs(logits - peft_case["lora_logits"]).max())
    print(f"PEFT LoRA parity ({'scanned' if scan else 'unrolled'}): max abs err {err:.3g}")
    np.testing.assert_allclose(logits, peft_case["lora_logits"], atol=1e-4, rtol=0)
    # the adapter really changes the output, so the comparison above tests it
    assert np.abs(peft_case["lora_logits"] - peft_case["base_logits"]).max() > 0.5


@pytest.mark.parametrize("rank,alpha", [(8, 16.0), (4, 32.0)])
def test_peft_adapter_rank_or_alpha_mismatch(official, peft_case, rank, alpha):
    cfg = _lora_model_config(official, peft_case, rank=rank, alpha=alpha)
    model = build_model(cfg)
    with pytest.raises(CheckpointMismatchError, match="r=4"):
        load_peft_lora(model, cfg, peft_case["adapter_dir"], layout="hf-llama")


def test_peft_adapter_on_modules_the_model_does_not_adapt(official, peft_case):
    """Adapter for q/v into a model with LoRA on q only: the v adapters are listed as unexpected."""
    cfg = dataclasses.replace(_lora_model_config(official, peft_case),
                              lora=LoRAConfig(rank=4, alpha=16.0, targets=[r"language_model\..*\.q_proj$"]))
    model = build_model(cfg)
    with pytest.raises(MISMATCH, match=r"layers\.0\.self_attn\.v_proj\.lora\.lora_a"):
        load_peft_lora(model, cfg, peft_case["adapter_dir"], layout="hf-llama")


def test_model_exports_give_back_the_checkpoints(official, loaded_models, golden_dir):
    """import(official) then export: same keys (incl. the rotary buffers), shapes and bit-identical values,
    from both layer layouts; the LLM and vision exports equal the corresponding official parts; the
    golden PEFT adapter survives import -> export unchanged."""
    from owl_jax.convert.mplug_owl import (export_hf_clip_vision, export_hf_llama, export_official,
                                           export_peft_lora, load_peft_lora)
    cfg, directory, tensors = official
    for model in loaded_models.values():
        assert_same_tensors(export_official(model, cfg), tensors)
    model = loaded_models[False]
    llm = {k[len("language_model."):]: v for k, v in tensors.items()
           if k.startswith("language_model.") and "inv_freq" not in k}
    assert_same_tensors(export_hf_llama(model, cfg), llm)
    vision = {k[len("vision_model."):]: v for k, v in tensors.items() if k.startswith("vision_model.")}
    assert_same_tensors(export_hf_clip_vision(model, cfg), clip.official_to_hf_clip(vision, cfg.vision))
    with pytest.raises(CheckpointMismatchError, match="no LoRA adapters"):
        export_peft_lora(model, cfg)

    lora_cfg = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, rank=4, alpha=32.0))
    adapted = build_model(lora_cfg)
    load_official(adapted, lora_cfg, directory)
    load_peft_lora(adapted, lora_cfg, golden_dir / "lora_adapter")
    assert_same_tensors(export_peft_lora(adapted, lora_cfg), load_tensors(golden_dir / "lora_adapter"))
