"""Numerical parity with Hugging Face transformers (PyTorch, float32, eval mode) after importing HF
checkpoints written by `save_pretrained`: `CLIPVisionModel` into the vision tower, `LlamaForCausalLM`
(MHA, GQA, explicit head_dim, llama3 / linear rope scaling, tied embeddings) into the language model,
from single-file, sharded and legacy `.bin` checkpoints, with unrolled and scanned layers.

Every HF parameter is re-drawn at random (LayerNorm / RMSNorm scales around 1, non-zero biases, Linear
weights ~ N(0, 1/fan_in)) so that a wrong key mapping, transpose, q/k/v layout or epsilon cannot pass.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from owl_jax.config import AbstractorConfig, ModelConfig, RopeScalingConfig, VisionConfig  # noqa: E402
from owl_jax.convert import clip  # noqa: E402
from owl_jax.convert.mplug_owl import (load_hf_clip_vision, load_hf_llama, text_config_from_hf,  # noqa: E402
                                       vision_config_from_hf)
from owl_jax.models.llama import rope_inv_freq  # noqa: E402
from owl_jax.models.owl import build_model  # noqa: E402
from helpers import max_err, randomize_  # noqa: E402

ATOL = 1e-4
SEQ_LEN, BATCH = 24, 2

# Sizes of the golden fixture's tiny model (tests/fixtures/mplug_owl_v1_tiny), so that the eagerly compiled
# parameter initialisers are shared with the other test files. The composite model needs all three parts;
# the CLIP tests compare only the vision tower, the LLaMA tests only the language model.
CLIP_KW = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, image_size=56,
               patch_size=14)
TINY_VISION = VisionConfig(hidden_size=64, intermediate_size=256, num_layers=2, num_heads=4, image_size=56,
                           patch_size=14)
TINY_ABSTRACTOR = AbstractorConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=96, num_queries=8)
LLAMA_BASE = dict(vocab_size=512, hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0)


@nnx.jit
def _vision_forward(model, pixels):
    tower = model.vision_model
    return tower.hidden_states(pixels), tower(pixels)


@nnx.jit
def _llm_logits(model, tokens):
    return model.logits(tokens)


@nnx.jit
def _llm_hidden_states(model, tokens):
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return model.language_model.hidden_states(model.language_model.embed(tokens), positions)


# --------------------------------------------------------------------------------------------------
# CLIP vision tower
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(**CLIP_KW, hidden_act="quick_gelu", layer_norm_eps=1e-6, attn_implementation="eager")
    torch.manual_seed(0)
    model = CLIPVisionModel(config).eval()
    randomize_(model, seed=1)
    directory = tmp_path_factory.mktemp("hf_clip")
    model.save_pretrained(directory, safe_serialization=True)

    pixels = np.random.default_rng(0).normal(size=(2, 3, 56, 56)).astype(np.float32)
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(pixels), output_hidden_states=True)
        # HF's `last_hidden_state` is the encoder output *before* post_layernorm (only the pooled CLS
        # token is post-normed); mPLUG-Owl post-norms every token, so apply it here.
        post = model.post_layernorm(out.last_hidden_state)
    assert len(out.hidden_states) == config.num_hidden_layers + 1
    torch.testing.assert_close(out.hidden_states[-1], out.last_hidden_state)
    return dict(config=config, model=model, dir=directory, pixels=pixels,
                hidden_states=[h.numpy() for h in out.hidden_states], post=post.numpy())


def _owl_for_clip(hf_config, scan: bool):
    vision = vision_config_from_hf(hf_config.to_dict())
    assert vision == TINY_VISION
    text = text_config_from_hf(transformers.LlamaConfig(**LLAMA_BASE).to_dict())
    cfg = ModelConfig(vision=vision, abstractor=TINY_ABSTRACTOR, text=text, scan_layers=scan)
    return cfg, build_model(cfg)


def _check_clip(model, case) -> float:
    model.eval()
    hidden, post = _vision_forward(model, jnp.asarray(case["pixels"].transpose(0, 2, 3, 1)))
    assert len(hidden) == len(case["hidden_states"])
    errors = [max_err(ours, ref) for ours, ref in zip(hidden, case["hidden_states"])]
    errors.append(max_err(post, case["post"]))
    for i, (ours, ref) in enumerate(zip(hidden, case["hidden_states"])):
        np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=0, err_msg=f"hidden_states[{i}]")
    np.testing.assert_allclose(post, case["post"], atol=ATOL, rtol=0, err_msg="post_layernorm output")
    return max(errors)


def test_hf_clip_checkpoint_keys(hf_clip):
    """transformers 5 writes CLIPVisionModel weights without the `vision_model.` prefix of v4."""
    from safetensors import safe_open

    with safe_open(str(hf_clip["dir"] / "model.safetensors"), "np") as f:
        keys = list(f.keys())
    assert "embeddings.class_embedding" in keys and "pre_layrnorm.weight" in keys
    assert not any(k.startswith("vision_model.") for k in keys)


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_hf_clip_vision_parity(hf_clip, scan):
    cfg, model = _owl_for_clip(hf_clip["config"], scan)
    load_hf_clip_vision(model, cfg, hf_clip["dir"])
    err = _check_clip(model, hf_clip)
    print(f"CLIP parity ({'scanned' if scan else 'unrolled'}): max abs err {err:.3g}")


def test_hf_clip_vision_parity_prefixed_keys(hf_clip, tmp_path):
    """The v4 layout (`vision_model.*`, with the `position_ids` buffer) and a full CLIPModel-style file
    (text tower and projections present) import the same weights."""
    from safetensors.torch import save_file

    state = {f"vision_model.{k}": v.contiguous() for k, v in hf_clip["model"].state_dict().items()}
    state["vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    state["text_model.embeddings.token_embedding.weight"] = torch.zeros(8, 4)
    state["visual_projection.weight"] = torch.zeros(4, CLIP_KW["hidden_size"])
    state["logit_scale"] = torch.tensor(2.6592)
    save_file(state, str(tmp_path / "model.safetensors"))
    cfg, model = _owl_for_clip(hf_clip["config"], scan=False)
    load_hf_clip_vision(model, cfg, tmp_path)
    _check_clip(model, hf_clip)


def test_hf_clip_parity_detects_qkv_concatenation(hf_clip, monkeypatch):
    """Sensitivity check of this test itself: fusing q/k/v by plain concatenation (instead of the
    per-head interleave the official layout uses) loads without error but must fail parity."""
    monkeypatch.setattr(clip, "interleave_qkv", lambda q, k, v, num_heads: np.concatenate([q, k, v]))
    cfg, model = _owl_for_clip(hf_clip["config"], scan=False)
    load_hf_clip_vision(model, cfg, hf_clip["dir"])
    model.eval()
    hidden, post = _vision_forward(model, jnp.asarray(hf_clip["pixels"].transpose(0, 2, 3, 1)))
    assert max_err(hidden[0], hf_clip["hidden_states"][0]) < ATOL  # embeddings do not involve q/k/v
    assert max_err(post, hf_clip["post"]) > 0.1


# --------------------------------------------------------------------------------------------------
# LLaMA
# --------------------------------------------------------------------------------------------------

LLAMA_CASES = {
    "mha": dict(num_key_value_heads=4),
    "gqa": dict(num_key_value_heads=2),
    "head_dim": dict(num_key_value_heads=2, head_dim=32),
    # theta 500000, head_dim 24: wavelengths 6.3 (kept), 18.8 and 56 (smoothed), >= 167 (divided by 8)
    # against the original context of 64 (high / low wavelength bounds 16 / 64); sequences of 24 tokens.
    "llama3": dict(num_key_value_heads=2, rope_theta=500000.0,
                   rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                     original_max_position_embeddings=64)),
    "linear": dict(num_key_value_heads=4, rope_scaling=dict(rope_type="linear", factor=2.0)),
    "tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
}


def _tokens(vocab: int) -> np.ndarray:
    return np.random.default_rng(1).integers(0, vocab, size=(BATCH, SEQ_LEN)).astype(np.int32)


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    """name -> HF model, its config, a `save_pretrained` directory, input tokens and reference outputs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cases = {}
    for i, (name, kw) in enumerate(LLAMA_CASES.items()):
        config = LlamaConfig(**{**LLAMA_BASE, **kw}, attn_implementation="eager")
        torch.manual_seed(i)
        model = LlamaForCausalLM(config).eval()
        randomize_(model, seed=100 + i)
        directory = tmp_path_factory.mktemp(f"hf_llama_{name}")
        model.save_pretrained(directory, safe_serialization=True)
        tokens = _tokens(config.vocab_size)
        with torch.no_grad():
            out = model(input_ids=torch.from_numpy(tokens).long(), output_hidden_states=True)
        cases[name] = dict(config=config, model=model, dir=directory, tokens=tokens, logits=out.logits.numpy(),
                           hidden_states=[h.numpy() for h in out.hidden_states])
    return cases


def _owl_for_llama(hf_config, *, scan: bool = False, **text_overrides):
    text = text_config_from_hf(hf_config.to_dict())
    if text_overrides:
        text = dataclasses.replace(text, **text_overrides)
    cfg = dataclasses.replace(ModelConfig(), vision=TINY_VISION, abstractor=TINY_ABSTRACTOR, text=text,
                              scan_layers=scan)
    return cfg, build_model(cfg)


def _loaded_llama(case, path=None, *, scan=False):
    cfg, model = _owl_for_llama(case["config"], scan=scan)
    load_hf_llama(model, cfg, case["dir"] if path is None else path)
    model.eval()
    return cfg, model


def test_text_config_from_hf(hf_llama):
    t = text_config_from_hf(hf_llama["llama3"]["config"].to_dict())
    assert (t.num_heads, t.kv_heads, t.dim_per_head, t.rope_theta) == (4, 2, 24, 500000.0)
    assert t.rope_scaling == RopeScalingConfig(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                               original_max_position_embeddings=64)
    assert t.rms_norm_eps == 1e-5 and not t.tie_word_embeddings
    assert text_config_from_hf(hf_llama["head_dim"]["config"].to_dict()).dim_per_head == 32
    assert text_config_from_hf(hf_llama["tied"]["config"].to_dict()).tie_word_embeddings
    assert text_config_from_hf(hf_llama["linear"]["config"].to_dict()).rope_scaling.type == "linear"
    # the config.json that save_pretrained wrote reads the same as the in-memory config
    saved = json.loads((hf_llama["llama3"]["dir"] / "config.json").read_text())
    assert text_config_from_hf(saved) == t


@pytest.mark.parametrize("name", ["llama3", "linear", "mha"])
def test_rope_inv_freq_matches_hf(hf_llama, name):
    case = hf_llama[name]
    ours = rope_inv_freq(text_config_from_hf(case["config"].to_dict()))
    ref = case["model"].model.rotary_emb.inv_freq.numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=0)
    if name == "llama3":  # the test config exercises all three llama3 regimes
        plain = rope_inv_freq(dataclasses.replace(text_config_from_hf(case["config"].to_dict()),
                                                  rope_scaling=RopeScalingConfig()))
        ratio = plain / ours
        assert np.isclose(ratio, 1.0).any() and np.isclose(ratio, 8.0).any()
        assert ((ratio > 1.01) & (ratio < 7.99)).any()


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
@pytest.mark.parametrize("name", list(LLAMA_CASES))
def test_hf_llama_logits_parity(hf_llama, name, scan):
    case = hf_llama[name]
    cfg, model = _loaded_llama(case, scan=scan)
    assert (model.language_model.lm_head is None) == (name == "tied")
    logits = _llm_logits(model, jnp.asarray(case["tokens"]))
    assert logits.dtype == jnp.float32 and logits.shape == case["logits"].shape
    err = max_err(logits, case["logits"])
    print(f"LLaMA parity {name} ({'scanned' if scan else 'unrolled'}): max abs err {err:.3g}")
    np.testing.assert_allclose(logits, case["logits"], atol=ATOL, rtol=0)
    assert np.abs(case["logits"]).max() > 1.0  # the reference is not trivially small


def test_hf_llama_hidden_states_parity(hf_llama):
    case = hf_llama["gqa"]
    _, model = _loaded_llama(case)
    ours = _llm_hidden_states(model, jnp.asarray(case["tokens"]))
    assert len(ours) == len(case["hidden_states"])
    for i, (a, b) in enumerate(zip(ours, case["hidden_states"])):
        np.testing.assert_allclose(a, b, atol=ATOL, rtol=0, err_msg=f"hidden_states[{i}]")


def test_hf_llama_rope_scaling_matters(hf_llama):
    """Sensitivity check: ignoring the llama3 scaling gives clearly different logits at this length."""
    case = hf_llama["llama3"]
    cfg, model = _owl_for_llama(case["config"], rope_scaling=RopeScalingConfig())
    load_hf_llama(model, cfg, case["dir"])
    model.eval()
    assert max_err(_llm_logits(model, jnp.asarray(case["tokens"])), case["logits"]) > 1e-2


def test_hf_llama_sharded_checkpoint(hf_llama, tmp_path):
    case = hf_llama["gqa"]
    case["model"].save_pretrained(tmp_path, safe_serialization=True, max_shard_size="50KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (tmp_path / "model.safetensors").exists()
    _, model = _loaded_llama(case, tmp_path)
    err = max_err(_llm_logits(model, jnp.asarray(case["tokens"])), case["logits"])
    print(f"LLaMA parity sharded: max abs err {err:.3g}")
    assert err < ATOL


@pytest.mark.parametrize("name", ["gqa", "tied"])
def test_hf_llama_legacy_bin(hf_llama, tmp_path, name):
    """`pytorch_model.bin` as transformers < 4.31 wrote it: a pickled state dict (incl. the tied
    `lm_head.weight` alias of tied models) with the `rotary_emb.inv_freq` buffers. transformers 5 no longer
    writes .bin files (`safe_serialization=False` is ignored), so torch.save the state dict directly."""
    case = hf_llama[name]
    state = dict(case["model"].state_dict())
    for i in range(case["config"].num_hidden_layers):
        state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = case["model"].model.rotary_emb.inv_freq.clone()
    assert "lm_head.weight" in state
    if name == "tied":
        assert torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])
    torch.save(state, tmp_path / "pytorch_model.bin")
    _, model = _loaded_llama(case, tmp_path)
    err = max_err(_llm_logits(model, jnp.asarray(case["tokens"])), case["logits"])
    print(f"LLaMA parity legacy .bin {name}: max abs err {err:.3g}")
    assert err < ATOL


def test_hf_llama_tied_bin_with_different_lm_head_is_refused(hf_llama, tmp_path):
    """A tied config must not silently drop an lm_head that is *not* the embedding."""
    from owl_jax.convert.keymap import CheckpointMismatchError

    case = hf_llama["tied"]
    state = {k: v.clone() for k, v in case["model"].state_dict().items()}
    state["lm_head.weight"] = state["lm_head.weight"] + 1.0
    torch.save(state, tmp_path / "pytorch_model.bin")
    cfg, model = _owl_for_llama(case["config"])
    with pytest.raises(CheckpointMismatchError, match="lm_head.weight"):
        load_hf_llama(model, cfg, tmp_path)
