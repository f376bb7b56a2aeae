"""Export to the PyTorch side (transformers 5 / PEFT on CPU, float32) and streaming import.

- Each export loads with `from_pretrained(..., local_files_only=True)` / `PeftModel.from_pretrained` and
  gives owl-jax's logits (hidden states for the vision tower) within 1e-4; the PEFT adapter on the base
  export equals the merged export.
- Round trips are exact: import(export(x)) == x for every format; the golden official checkpoint imported
  and exported as `mplug-owl` gives back its keys, shapes and values bit for bit, and its config.
- Streaming import equals the eager import on an 8-device mesh, keeps every parameter's sharding, and
  never holds more than the tensors of one parameter; `init.owl_from` streams into the sharded train state.
- The CLI end to end on a tiny training run checkpoint (LoRA, SentencePiece tokenizer), and its errors.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import weakref

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from owl_jax.config import LoRAConfig, MeshConfig, RopeScalingConfig, load_config  # noqa: E402
from owl_jax.convert.io import load_tensors  # noqa: E402
from owl_jax.convert.keymap import tensors_to_params  # noqa: E402
from owl_jax.convert.llama import IGNORED_BUFFERS  # noqa: E402
from owl_jax.convert.mplug_owl import (load_hf_clip_vision, load_hf_llama, load_official, load_peft_lora,  # noqa: E402
                                       lora_rules_from_keys, official_rules, read_official_config)
from owl_jax.convert.sources import TensorSource, open_source  # noqa: E402
from owl_jax.convert import clip  # noqa: E402
from owl_jax.convert.state import (assign_canonical_params, canonical_params, canonical_shapes,  # noqa: E402
                                   parameter_layout)
from owl_jax.convert.stream import stream_params  # noqa: E402
from owl_jax.export import ExportError, export_model, main, merge_adapters  # noqa: E402
from owl_jax.models.owl import build_model  # noqa: E402
from owl_jax.sharding import make_mesh, state_shardings  # noqa: E402
from helpers import assert_same_tensors, max_err, random_canonical_params, random_model, same_bits  # noqa: E402

ATOL = 1e-4
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LORA = LoRAConfig(rank=4, alpha=32.0, dropout=0.0, targets=[r"language_model\..*\.(q_proj|v_proj)$"])


def _tokens(vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, vocab, size=(2, 24)).astype(np.int32)


@nnx.jit
def _owl_logits(model, tokens):
    return model.logits(tokens)


@nnx.jit
def _owl_vision(model, pixels):
    return model.vision_model.hidden_states(pixels), model.vision_model(pixels)


def _numpy(params: dict) -> dict:
    return {k: np.asarray(v) for k, v in params.items()}


def _torch_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(tokens).long()).logits.float().numpy()


def _hf_llama(directory):
    return transformers.LlamaForCausalLM.from_pretrained(directory, local_files_only=True, dtype=torch.float32,
                                                         attn_implementation="eager").eval()


# --------------------------------------------------------------------------------------------------
# Exports of the golden weights with random LoRA adapters
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_model(official):
    cfg, directory, _ = official
    model = build_model(cfg)
    load_official(model, cfg, directory)
    model.eval()
    return model


@pytest.fixture(scope="module")
def lora_case(official, tmp_path_factory):
    """The golden checkpoint with LoRA adapters (random B, so they change the output) on the LLM's q/v,
    and its exports: hf-llama base (sharded) and merged, PEFT for both layouts, mplug-owl merged, CLIP."""
    golden_cfg, directory, _ = official
    cfg = dataclasses.replace(golden_cfg, lora=LORA)
    model = build_model(cfg)
    load_official(model, cfg, directory)
    lora = {k: v for k, v in canonical_shapes(model).items() if ".lora." in k}
    assign_canonical_params(model, random_canonical_params(lora, seed=3), include=lambda p: ".lora." in p)
    model.eval()
    root = tmp_path_factory.mktemp("exports")
    dirs = {name: root / name for name in ("base", "merged", "peft_hf", "peft_owl", "owl_merged", "clip")}
    kw = dict(dtype="float32")
    export_model(nnx.clone(model), cfg, dirs["base"], "hf-llama", base_only=True, max_shard_bytes=100_000, **kw)
    export_model(nnx.clone(model), cfg, dirs["merged"], "hf-llama", merge_lora=True, **kw)
    export_model(model, cfg, dirs["peft_hf"], "peft-lora", layout="hf-llama", **kw)
    export_model(model, cfg, dirs["peft_owl"], "peft-lora", layout="mplug-owl", **kw)
    export_model(nnx.clone(model), cfg, dirs["owl_merged"], "mplug-owl", merge_lora=True, **kw)
    export_model(model, cfg, dirs["clip"], "hf-clip-vision", **kw)
    tokens = _tokens(cfg.text.vocab_size)
    return dict(cfg=cfg, model=model, dirs=dirs, tokens=tokens,
                logits=np.asarray(_owl_logits(model, jnp.asarray(tokens))))


def test_hf_llama_exports_match_transformers(lora_case, base_model):
    case, tokens = lora_case, lora_case["tokens"]
    merged = _torch_logits(_hf_llama(case["dirs"]["merged"]), tokens)
    err = max_err(merged, case["logits"])
    print(f"hf-llama merged export vs owl-jax LoRA logits: max abs err {err:.3g}")
    assert err < ATOL
    index = json.loads((case["dirs"]["base"] / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3  # sharded above the size threshold
    base = _torch_logits(_hf_llama(case["dirs"]["base"]), tokens)
    assert max_err(base, _owl_logits(base_model, jnp.asarray(tokens))) < ATOL
    assert max_err(base, merged) > 0.1  # the adapters matter, so the comparisons above test them


def test_peft_adapter_on_base_equals_merged_export(lora_case):
    case, tokens = lora_case, lora_case["tokens"]
    adapter_config = json.loads((case["dirs"]["peft_hf"] / "adapter_config.json").read_text())
    assert adapter_config["target_modules"] == ["q_proj", "v_proj"] and adapter_config["r"] == 4
    with_adapter = peft.PeftModel.from_pretrained(_hf_llama(case["dirs"]["base"]), case["dirs"]["peft_hf"],
                                                  local_files_only=True).eval()
    logits = _torch_logits(with_adapter, tokens)
    merged = _torch_logits(_hf_llama(case["dirs"]["merged"]), tokens)
    print(f"PEFT adapter on base vs merged export: max abs err {max_err(logits, merged):.3g}")
    assert max_err(logits, merged) < ATOL
    assert max_err(logits, case["logits"]) < ATOL


def test_clip_vision_export_matches_transformers(lora_case):
    case = lora_case
    directory = case["dirs"]["clip"]
    hf = transformers.CLIPVisionModel.from_pretrained(directory, local_files_only=True, dtype=torch.float32,
                                                      attn_implementation="eager").eval()
    size = case["cfg"].vision.image_size
    pixels = np.random.default_rng(1).normal(size=(2, 3, size, size)).astype(np.float32)
    with torch.no_grad():
        out = hf(pixel_values=torch.from_numpy(pixels), output_hidden_states=True)
        post = hf.post_layernorm(out.last_hidden_state).numpy()
    hidden, ours = _owl_vision(case["model"], jnp.asarray(pixels.transpose(0, 2, 3, 1)))
    errors = [max_err(a, b) for a, b in zip(hidden, out.hidden_states)] + [max_err(ours, post)]
    print(f"hf-clip-vision export vs owl-jax tower: max abs err {max(errors):.3g}")
    assert len(hidden) == len(out.hidden_states) and max(errors) < ATOL
    processor = transformers.CLIPImageProcessor.from_pretrained(directory, local_files_only=True)
    # the form transformers 4.28-4.31 accept (size by shortest edge) and the official processor reads
    written = json.loads((directory / "preprocessor_config.json").read_text())
    assert written["size"] == {"shortest_edge": size} and written["crop_size"] == {"height": size, "width": size}
    np.testing.assert_allclose(processor.image_mean, [0.48145466, 0.4578275, 0.40821073])
    # on an image squashed to size x size (the official processor's first step) it gives owl-jax's pixels
    from PIL import Image
    from data_pipelines.images import preprocess
    photo = Image.fromarray(np.random.default_rng(2).integers(0, 256, (40, 70, 3), dtype=np.uint8))
    square = photo.resize((size, size), 3)
    theirs = processor(square, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    np.testing.assert_allclose(theirs, preprocess(photo, size, train=False), atol=2e-2)


def test_peft_target_modules_are_exactly_the_adapted_layers(official, golden_dir, lora_case):
    from owl_jax.convert.hf_configs import peft_target_modules
    from owl_jax.convert.llama import llama_rules

    cfg = official[0]
    golden = json.loads((golden_dir / "lora_adapter" / "adapter_config.json").read_text())
    exported = json.loads((lora_case["dirs"]["peft_owl"] / "adapter_config.json").read_text())
    assert exported["target_modules"] == golden["target_modules"]  # `.*language_model.*\.(q_proj|v_proj)`
    assert (exported["r"], exported["lora_alpha"], exported["peft_type"]) == (4, 32, "LORA")
    some = ["model.layers.1.self_attn.q_proj"]  # not every q_proj: the full names, nothing more
    assert peft_target_modules(some, llama_rules(cfg.text), official=False) == some
    every = [f"model.layers.{i}.mlp.{n}" for i in range(2) for n in ("up_proj", "down_proj")]
    assert peft_target_modules(every, llama_rules(cfg.text), official=False) == ["down_proj", "up_proj"]


def test_round_trips_are_exact(lora_case, official):
    """import(export(x)) == x, bit for bit, for every format (float32 exports)."""
    case, cfg, dirs = lora_case, lora_case["cfg"], lora_case["dirs"]
    want = _numpy(canonical_params(case["model"]))
    fresh = build_model(cfg)
    load_hf_llama(fresh, cfg, dirs["base"])
    load_hf_clip_vision(fresh, cfg, dirs["clip"])
    load_peft_lora(fresh, cfg, dirs["peft_hf"], layout="hf-llama")
    got = _numpy(canonical_params(fresh))
    checked = [k for k in want if not k.startswith("abstractor.")]
    assert all(same_bits(got[k], want[k]) for k in checked)
    again = build_model(cfg)
    load_peft_lora(again, cfg, dirs["peft_owl"])
    lora = [k for k in want if ".lora." in k]
    assert lora and all(same_bits(np.asarray(canonical_params(again)[k]), want[k]) for k in lora)

    merged = nnx.clone(case["model"])
    merge_adapters(merged)
    golden_cfg = official[0]
    plain = build_model(golden_cfg)
    load_official(plain, golden_cfg, dirs["owl_merged"])
    assert_same_tensors(_numpy(canonical_params(plain)), _numpy(canonical_params(merged)))
    # and the merged mplug-owl export's LLM equals the merged hf-llama export
    owl = load_tensors(dirs["owl_merged"])
    llm = {k[len("language_model."):]: v for k, v in owl.items() if k.startswith("language_model.") and "inv_freq" not in k}
    assert_same_tensors(llm, load_tensors(dirs["merged"]))


# --------------------------------------------------------------------------------------------------
# The golden official checkpoint
# --------------------------------------------------------------------------------------------------


def _shared_keys_equal(ours: dict, theirs: dict, where: str = "") -> list[str]:
    """Keys present in both nested dicts whose values differ (config schema comparison)."""
    diffs = []
    for key in set(ours) & set(theirs):
        a, b = ours[key], theirs[key]
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _shared_keys_equal(a, b, f"{where}{key}.")
        elif key not in ("torch_dtype", "transformers_version") and a != b:
            diffs.append(f"{where}{key}: {a!r} vs golden {b!r}")
    return diffs


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_golden_checkpoint_export_gives_it_back(official, base_model, tmp_path, scan):
    cfg, directory, tensors = official
    if scan:
        c = dataclasses.replace(cfg, scan_layers=True)
        model = build_model(c)
        load_official(model, c, directory)
    else:
        model = base_model
    export_model(model, cfg, tmp_path / "f32", "mplug-owl", dtype="float32")
    assert_same_tensors(load_tensors(tmp_path / "f32"), tensors)  # keys, shapes, values (rotary buffers too)
    exported = json.loads((tmp_path / "f32" / "config.json").read_text())
    golden = json.loads((directory / "config.json").read_text())
    assert not _shared_keys_equal(exported, golden)
    assert {k for k in golden if not k.startswith("_") and golden[k] is not None} <= set(exported)
    assert read_official_config(tmp_path / "f32") == cfg
    generation = json.loads((tmp_path / "f32" / "generation_config.json").read_text())
    assert (generation["top_k"], generation["top_p"], generation["no_repeat_ngram_size"]) == (3, 0.9, 2)
    if scan:
        return
    # bf16 (the default): every weight rounded once to bf16, buffers kept in float32
    export_model(model, cfg, tmp_path / "bf16", "mplug-owl")
    bf16 = load_tensors(tmp_path / "bf16")
    assert_same_tensors(bf16, {k: v if "inv_freq" in k else v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()})
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_mplug_owl_export_language_model_runs_in_transformers(official, base_model, tmp_path):
    """The official export's `text_config` is a valid `LlamaConfig` and its `language_model.*` tensors a
    `LlamaForCausalLM` state dict (the official model wraps exactly that)."""
    cfg, _, _ = official
    export_model(base_model, cfg, tmp_path, "mplug-owl", dtype="float32")
    config = json.loads((tmp_path / "config.json").read_text())
    text_config = {k: v for k, v in config["text_config"].items() if k != "model_type"}
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**text_config, attn_implementation="eager")).eval()
    state = {k[len("language_model."):]: torch.from_numpy(v) for k, v in load_tensors(tmp_path).items()
             if k.startswith("language_model.") and "inv_freq" not in k}
    hf.load_state_dict(state, strict=True)
    tokens = _tokens(cfg.text.vocab_size, seed=2)
    assert max_err(_torch_logits(hf, tokens), _owl_logits(base_model, jnp.asarray(tokens))) < ATOL


def test_hf_llama_export_of_gqa_llama3_tied_model(official, tmp_path):
    """Config keys transformers must read right: grouped-query heads, explicit head_dim, rope_theta with
    llama3 scaling, tied embeddings (no lm_head tensor)."""
    golden_cfg, _, _ = official
    text = dataclasses.replace(golden_cfg.text, num_kv_heads=2, head_dim=32, rope_theta=500000.0,
                               tie_word_embeddings=True,
                               rope_scaling=RopeScalingConfig(type="llama3", factor=8.0, low_freq_factor=1.0,
                                                              high_freq_factor=4.0,
                                                              original_max_position_embeddings=64))
    cfg = dataclasses.replace(golden_cfg, text=text)
    model = random_model(cfg, seed=5)
    model.eval()
    export_model(model, cfg, tmp_path, "hf-llama", dtype="float32")
    assert "lm_head.weight" not in load_tensors(tmp_path)
    hf = _hf_llama(tmp_path)
    assert hf.config.num_key_value_heads == 2 and hf.config.head_dim == 32 and hf.config.tie_word_embeddings
    tokens = _tokens(cfg.text.vocab_size, seed=4)
    err = max_err(_torch_logits(hf, tokens), _owl_logits(model, jnp.asarray(tokens)))
    print(f"hf-llama export (GQA, head_dim, llama3 rope, tied): max abs err {err:.3g}")
    assert err < ATOL
    back = build_model(cfg)
    load_hf_llama(back, cfg, tmp_path)
    want, got = _numpy(canonical_params(model)), _numpy(canonical_params(back))
    assert all(same_bits(got[k], want[k]) for k in want if k.startswith("language_model."))


def test_export_refuses_what_it_cannot_do(official, base_model, lora_case, tmp_path):
    cfg = official[0]
    with pytest.raises(ExportError, match="no LoRA adapters"):
        export_model(base_model, cfg, tmp_path / "a", "peft-lora")
    with pytest.raises(ExportError, match="--merge-lora"):
        export_model(lora_case["model"], lora_case["cfg"], tmp_path / "b", "hf-llama")
    vision_lora = dataclasses.replace(cfg, lora=dataclasses.replace(LORA, targets=[r"vision_model\..*fc1$"]))
    with pytest.raises(ExportError, match="hf-llama layout"):
        export_model(build_model(vision_lora), vision_lora, tmp_path / "c", "peft-lora", layout="hf-llama")
    # but the vision-only export of a model with LLM adapters needs no LoRA decision
    export_model(lora_case["model"], lora_case["cfg"], tmp_path / "d", "hf-clip-vision")


def test_import_names_a_checkpoint_of_another_architecture(official, base_model, lora_case):
    from owl_jax.convert.keymap import CheckpointMismatchError

    cfg, dirs = official[0], lora_case["dirs"]
    with pytest.raises(CheckpointMismatchError, match="'clip_vision_model' checkpoint .* not a LLaMA"):
        load_hf_llama(base_model, cfg, dirs["clip"])
    with pytest.raises(CheckpointMismatchError, match="'llama' checkpoint .* not a mPLUG-Owl"):
        load_official(base_model, cfg, dirs["base"])
    with pytest.raises(CheckpointMismatchError, match="'mplug-owl' checkpoint .* not a CLIP"):
        load_hf_clip_vision(base_model, cfg, official[1])


# --------------------------------------------------------------------------------------------------
# Streaming import
# --------------------------------------------------------------------------------------------------


class CountingSource(TensorSource):
    """Wraps a source and tracks how many tensors it returned are still alive (weak references)."""

    def __init__(self, inner: TensorSource):
        self.inner, self.name = inner, inner.name
        self.live = self.peak = self.reads = 0

    def keys(self):
        return self.inner.keys()

    def shape(self, key):
        return self.inner.shape(key)

    def dtype(self, key):
        return self.inner.dtype(key)

    def __contains__(self, key):
        return key in self.inner

    def read(self, key):
        x = self.inner.read(key)
        self.reads += 1
        self.live += 1
        self.peak = max(self.peak, self.live)
        weakref.finalize(x, self._released)
        return x

    def _released(self):
        self.live -= 1


def _on_mesh(model, mesh):
    """Place a model's parameters with the shardings training uses (from the host: device-to-device
    resharding would compile one program per leaf); returns those shardings by path."""
    state = nnx.state(model, nnx.Param)
    shardings = state_shardings(state, mesh, MeshConfig().logical_axis_rules)
    nnx.update(model, jax.device_put(jax.tree.map(np.asarray, state), shardings))
    return {p: s.get_value() for p, s in nnx.to_flat_state(shardings)}


def _host_params(model) -> dict[str, np.ndarray]:
    """`canonical_params` computed on the host (slicing sharded stacks on device compiles per shape)."""
    out = {}
    for var, per_layer, name in parameter_layout(model):
        value = np.asarray(var.get_value())
        out.update({name: value} if per_layer is None else zip(per_layer, value))
    return out


def _shardings(model):
    return {p: v.get_value().sharding for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_streaming_import_equals_eager_on_a_mesh(official, lora_case, scan):
    cfg, directory, tensors = official
    cfg = dataclasses.replace(cfg, scan_layers=scan)
    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    model = build_model(cfg)
    placed = _on_mesh(model, mesh)
    assert any(len(s.spec) and any(a is not None for a in s.spec) for s in placed.values())  # really sharded
    load_official(model, cfg, directory)  # streaming
    eager = tensors_to_params(tensors, official_rules(cfg), ignore=IGNORED_BUFFERS)
    got = _host_params(model)
    assert_same_tensors(got, {k: np.asarray(v, np.float32) for k, v in eager.items()})
    after = _shardings(model)
    assert all(after[p] == s for p, s in placed.items() if p in after) and len(after) == len(placed)
    # HF CLIP (q/k/v fused per head while streaming) onto the same mesh
    load_hf_clip_vision(model, cfg, lora_case["dirs"]["clip"])
    got = _host_params(model)
    assert all(same_bits(got[k], np.asarray(eager[k], np.float32)) for k in eager if k.startswith("vision_model."))
    assert _shardings(model) == after


def test_streaming_holds_one_parameter_at_a_time(official, lora_case):
    cfg, directory, _ = official
    cfg = dataclasses.replace(cfg, scan_layers=True)
    model = build_model(cfg)
    source = CountingSource(open_source(directory))
    rules = official_rules(cfg)
    assert stream_params(model, source, rules, ignore=IGNORED_BUFFERS) == len(rules) == source.reads
    assert source.peak == 1 and source.live == 0
    # the fused q/k/v of HF CLIP needs its three tensors at once, and no more
    source = CountingSource(open_source(lora_case["dirs"]["clip"]))
    stream_params(model, clip.HFClipAsOfficial(source, cfg.vision), clip.official_vision_rules(cfg.vision),
                  include=lambda p: p.startswith("vision_model."))
    assert source.peak == 3 and source.live == 0


def test_streaming_checks_everything_before_loading(official, tmp_path):
    """A wrong tensor anywhere (here the last layer's) fails from the headers alone: nothing is read."""
    from owl_jax.convert.io import save_safetensors
    from owl_jax.convert.keymap import CheckpointMismatchError

    cfg, _, tensors = official
    bad = dict(tensors)
    key = "language_model.model.layers.1.mlp.down_proj.weight"
    bad[key] = np.zeros(tensors[key].shape[::-1], np.float32)
    save_safetensors(bad, tmp_path / "model.safetensors")
    source = CountingSource(open_source(tmp_path))
    model = build_model(cfg)
    with pytest.raises((CheckpointMismatchError, ValueError), match="layers.1.mlp.down_proj"):
        stream_params(model, source, official_rules(cfg), ignore=IGNORED_BUFFERS)
    assert source.reads == 0


# --------------------------------------------------------------------------------------------------
# The CLI on a training run checkpoint (which starts from the golden weights via init.owl_from)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(official, tmp_path_factory):
    """A stage-2 (LoRA) run of the tiny model on 8 devices, initialised by `init.owl_from` (streaming into
    the sharded train state), with a SentencePiece tokenizer, saved as the train CLI saves checkpoints.
    The LoRA B matrices are set non-zero (as training makes them) so that merging changes the weights."""
    from data_pipelines.synthetic import train_tokenizer
    from owl_jax.checkpoint import CheckpointStore
    from owl_jax.train import _init_weights
    from owl_jax.training.train_step import create_trainer

    _, directory, tensors = official
    root = tmp_path_factory.mktemp("cli_run")
    lines = ["a red picture of a cat", "a green square", "the quick brown fox jumps", "Human: what is it? AI: a dog"]
    (root / "spm.model").write_bytes(train_tokenizer(lines * 40, 300))
    cfg = load_config(os.path.join(ROOT, "configs/tiny_test.yaml"), [
        f"data.tokenizer={root / 'spm.model'}", "training.stage=instruct_lora", "model.lora.rank=4",
        "model.lora.alpha=16.0", "model.scan_layers=true", f"init.owl_from={directory}",
        f"training.output_dir={root / 'run'}"])
    trainer = create_trainer(cfg, make_mesh(cfg.mesh))
    before = _shardings(trainer.model())
    _init_weights(cfg, trainer)
    ts = nnx.merge(trainer.graphdef, trainer.state)
    model = ts.model
    # init streamed the golden weights into the sharded state, placement unchanged
    eager = tensors_to_params(tensors, official_rules(cfg.model), ignore=IGNORED_BUFFERS)
    got = _host_params(model)
    assert all(same_bits(got[k], np.asarray(eager[k], np.float32)) for k in eager)
    assert _shardings(model) == before
    lora = {k: v for k, v in canonical_shapes(model).items() if ".lora." in k}
    assign_canonical_params(model, random_canonical_params(lora, seed=7), include=lambda p: ".lora." in p)
    store = CheckpointStore(root / "run", cfg, tokenizer_path=cfg.data.tokenizer)
    store.save(1, nnx.state(ts), data_state={}, force=True)
    store.close()
    return root / "run"


@pytest.fixture(scope="module")
def run_model(run_dir):
    from owl_jax.checkpoint import load_run
    cfg, model = load_run(run_dir)
    model.eval()
    return cfg, model


def _export(run, out, *args) -> None:
    assert main(["--checkpoint", str(run), "--out", str(out), *args]) == 0


def test_cli_exports_of_a_training_run(run_dir, run_model, tmp_path):
    cfg, model = run_model
    tokens = _tokens(cfg.model.text.vocab_size, seed=6)
    ours = np.asarray(_owl_logits(model, jnp.asarray(tokens)))
    _export(run_dir, tmp_path / "merged", "--format", "hf-llama", "--merge-lora", "--dtype", "float32")
    merged = _torch_logits(_hf_llama(tmp_path / "merged"), tokens)
    print(f"CLI hf-llama --merge-lora vs the run's owl-jax logits: max abs err {max_err(merged, ours):.3g}")
    assert max_err(merged, ours) < ATOL
    # the run's SentencePiece tokenizer came along and loads with AutoTokenizer
    assert {"tokenizer.model", "tokenizer_config.json", "generation_config.json"} <= set(os.listdir(tmp_path / "merged"))
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "merged", local_files_only=True)
    from data_pipelines.tokenizers import load_tokenizer
    text = "a red picture of a cat"
    assert tok(text, add_special_tokens=False)["input_ids"] == load_tokenizer(cfg.data.tokenizer).encode(text)

    _export(run_dir / "checkpoints" / "1", tmp_path / "base", "--format", "hf-llama", "--base-only",
            "--dtype", "float32")
    _export(run_dir, tmp_path / "adapter", "--format", "peft-lora", "--layout", "hf-llama", "--dtype", "float32",
            "--legacy-adapter-bin")
    with_adapter = peft.PeftModel.from_pretrained(_hf_llama(tmp_path / "base"), tmp_path / "adapter",
                                                  local_files_only=True).eval()
    assert max_err(_torch_logits(with_adapter, tokens), merged) < ATOL
    # the legacy adapter_model.bin (peft < 0.5 reads only it): a plain tensor state dict, the same tensors,
    # and what peft loads when it is the only weight file there
    legacy = torch.load(tmp_path / "adapter" / "adapter_model.bin", weights_only=True)
    current = load_tensors(tmp_path / "adapter" / "adapter_model.safetensors")
    assert sorted(legacy) == sorted(current) and all(isinstance(v, torch.Tensor) for v in legacy.values())
    for key, value in legacy.items():
        np.testing.assert_array_equal(value.numpy(), np.asarray(current[key]))
    (tmp_path / "adapter" / "adapter_model.safetensors").unlink()
    from_bin = peft.PeftModel.from_pretrained(_hf_llama(tmp_path / "base"), tmp_path / "adapter",
                                              local_files_only=True).eval()
    assert max_err(_torch_logits(from_bin, tokens), merged) < ATOL

    # default bf16 official export: the run's weights rounded once; adapters for the official layout
    _export(run_dir, tmp_path / "owl", "--format", "mplug-owl", "--base-only", "--max-shard-size", "200KB")
    assert (tmp_path / "owl" / "model.safetensors.index.json").is_file()
    _export(run_dir, tmp_path / "owl_adapter", "--format", "peft-lora", "--legacy-adapter-bin")
    bf16 = torch.load(tmp_path / "owl_adapter" / "adapter_model.bin", weights_only=True)
    assert {v.dtype for v in bf16.values()} == {torch.bfloat16}
    (tmp_path / "owl_adapter" / "adapter_model.bin").unlink()
    owl = tensors_to_params(load_tensors(tmp_path / "owl"), official_rules(cfg.model), ignore=IGNORED_BUFFERS)
    adapter = load_tensors(tmp_path / "owl_adapter")
    owl.update(tensors_to_params(adapter, lora_rules_from_keys(list(adapter), official_rules(cfg.model))))
    want = {k: np.asarray(v).astype(ml_dtypes.bfloat16) for k, v in canonical_params(model).items()}
    assert_same_tensors(_numpy(owl), want)
    _export(run_dir, tmp_path / "clip", "--format", "hf-clip-vision")
    assert json.loads((tmp_path / "clip" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert transformers.CLIPVisionModel.from_pretrained(tmp_path / "clip", local_files_only=True).dtype == torch.bfloat16


@pytest.mark.parametrize("case", ["missing", "not_a_run", "hf_dir", "nonempty_out", "lora_undecided",
                                  "both_lora_flags", "bad_size"])
def test_cli_user_errors_exit_2(run_dir, official, tmp_path, capsys, case):
    out = tmp_path / "out"
    args = {"missing": ["--checkpoint", str(tmp_path / "nope"), "--format", "hf-llama"],
            "not_a_run": ["--checkpoint", str(tmp_path), "--format", "hf-llama"],
            "hf_dir": ["--checkpoint", str(official[1]), "--format", "mplug-owl"],
            "nonempty_out": ["--checkpoint", str(run_dir), "--format", "peft-lora"],
            "lora_undecided": ["--checkpoint", str(run_dir), "--format", "mplug-owl"],
            "both_lora_flags": ["--checkpoint", str(run_dir), "--format", "hf-llama", "--merge-lora", "--base-only"],
            "bad_size": ["--checkpoint", str(run_dir), "--format", "hf-llama", "--max-shard-size", "lots"]}[case]
    if case == "nonempty_out":
        out.mkdir()
        (out / "keep.txt").write_text("x")
    expect = {"missing": "neither a training run", "not_a_run": "neither a training run",
              "hf_dir": "Hugging Face checkpoint directory", "nonempty_out": "--force",
              "lora_undecided": "--merge-lora", "both_lora_flags": "not allowed with", "bad_size": "5GB"}[case]
    try:
        code = main([*args, "--out", str(out)])
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and expect in err and "Traceback" not in err
    if case == "nonempty_out":
        assert (out / "keep.txt").read_text() == "x"


def test_cli_as_a_command(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "owl_jax.export", "--checkpoint", str(tmp_path / "nope"),
                           "--format", "mplug-owl", "--out", str(tmp_path / "out")], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
