"""The LLaVA family: parity with transformers `LlavaForConditionalGeneration` (PyTorch, CPU, float32, tiny
random configs) and the llava weight layouts (llava-hf current and legacy keys, the original LLaVA
repository, a stage-1 `mm_projector.bin`), export and round trips.

Parity cases cover `linear` and `mlp2x_gelu` projectors, `vision_feature_layer` -2 and lists, both select
strategies, and a batch with one image, two images and no image in its three rows. transformers' projector
is always Linear -> act -> Linear, so the `linear` cases put LLaVA v1's single Linear (what
`build_vision_projector` makes) in its place; everything else (feature selection, splicing, the LLM) is
transformers' own code.
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

from owl_jax.config import ConfigError, load_config  # noqa: E402
from owl_jax.convert import llava  # noqa: E402
from owl_jax.convert.keymap import CheckpointMismatchError  # noqa: E402
from owl_jax.convert.state import (StateMismatchError, canonical_params,  # noqa: E402
                                   canonical_shapes)
from owl_jax.models.owl import build_model  # noqa: E402
from owl_jax.models.splice import plan_image_slots  # noqa: E402
from helpers import image_train_batch, max_err, random_model, randomize_  # noqa: E402

ATOL = 1e-4
VOCAB, IMAGE_TOKEN = 512, 511
CLIP_KW = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4, image_size=56,
               patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5)
LLAMA_KW = dict(vocab_size=VOCAB, hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False)
SEQ = 64
NUM_IMAGES = np.array([1, 2, 0])  # rows: one image, two images, text only

# name -> (owl-jax connector, vision_feature_layer, select strategy)
CASES = {
    "mlp2x_layer-2_default": ("mlp2x_gelu", -2, "default"),
    "mlp2x_list_full": ("mlp2x_gelu", [1, -2], "full"),
    "linear_layer-2_full": ("linear", -2, "full"),
    "linear_list_default": ("linear", [0, -1], "default"),
}


class LinearProjector(torch.nn.Module):
    """LLaVA v1's projector (one Linear) under the attribute name transformers' projector gives its first layer."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.linear_1 = torch.nn.Linear(d_in, d_out)

    def forward(self, x):
        return self.linear_1(x)


def _hf_model(connector: str, layer, strategy: str, seed: int):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    n_layers = 1 if isinstance(layer, int) else len(layer)
    tokens = 16 if strategy == "default" else 17
    config = LlavaConfig(vision_config=CLIPVisionConfig(**CLIP_KW).to_dict() | {"model_type": "clip_vision_model"},
                         text_config=LlamaConfig(**LLAMA_KW).to_dict() | {"model_type": "llama"},
                         image_token_index=IMAGE_TOKEN, vision_feature_layer=layer,
                         vision_feature_select_strategy=strategy, image_seq_length=tokens,
                         projector_hidden_act="gelu")
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    if connector == "linear":
        model.model.multi_modal_projector = LinearProjector(CLIP_KW["hidden_size"] * n_layers, LLAMA_KW["hidden_size"])
    randomize_(model, seed=seed)
    return model, tokens


def _inputs(tokens_per_image: int, seed: int = 0):
    """Token rows with image runs (HF: IMAGE_TOKEN ids; owl-jax: -1), and NCHW pixels of the 3 images."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 500, size=(3, SEQ)).astype(np.int64)
    starts = {0: [5], 1: [2, 4 + tokens_per_image]}  # two images with text between them
    ours = ids.copy()
    for row, positions in starts.items():
        for s in positions:
            ids[row, s:s + tokens_per_image] = IMAGE_TOKEN
            ours[row, s:s + tokens_per_image] = -1
    pixels = rng.normal(size=(3, 3, 56, 56)).astype(np.float32)
    return ids, ours.astype(np.int32), pixels


def _owl_cfg(connector: str, layer, strategy: str, **overrides):
    over = [f"model.connector={connector}", f"model.vision_feature_layer={json.dumps(layer)}",
            f"model.vision_feature_select_strategy={strategy}"] + [f"model.{k}={v}" for k, v in overrides.items()]
    return load_config("configs/model/tiny_llava.yaml", over).model


@nnx.jit
def _owl_logits(model, tokens, pixels, image_index):
    return model.logits(tokens, pixel_values=pixels, image_index=image_index)


def _logits(model, cfg, ours, pixels):
    index = plan_image_slots(ours, NUM_IMAGES, tokens_per_image=cfg.tokens_per_image, image_budget=4)
    pix = np.zeros((4, 56, 56, 3), np.float32)
    pix[:3] = pixels.transpose(0, 2, 3, 1)
    model.eval()
    return np.asarray(_owl_logits(model, jnp.asarray(ours), jnp.asarray(pix), jnp.asarray(index)))


@pytest.fixture(scope="module")
def hf_cases(tmp_path_factory):
    cases = {}
    for i, (name, (connector, layer, strategy)) in enumerate(CASES.items()):
        model, tpi = _hf_model(connector, layer, strategy, seed=10 + i)
        directory = tmp_path_factory.mktemp(f"llava_{name}")
        model.save_pretrained(directory, safe_serialization=True)
        ids, ours, pixels = _inputs(tpi)
        with torch.no_grad():
            logits = model(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(pixels)).logits.numpy()
        cases[name] = dict(model=model, dir=directory, ids=ids, ours=ours, pixels=pixels, logits=logits, tpi=tpi,
                           cfg=_owl_cfg(connector, layer, strategy))
    return cases


def _loaded(case, path=None, *, scan: bool = False):
    cfg = dataclasses.replace(case["cfg"], scan_layers=scan)
    model = build_model(cfg)
    assert llava.load_llava(model, cfg, case["dir"] if path is None else path) in llava.LAYOUTS
    return cfg, model


# --------------------------------------------------------------------------------------------------
# A: the composite and its config
# --------------------------------------------------------------------------------------------------


def test_tokens_per_image_come_from_the_connector():
    assert load_config("configs/model/tiny.yaml").model.tokens_per_image == 9  # 8 queries + vit_eos
    assert load_config("configs/model/owl_llama7b.yaml").model.tokens_per_image == 65
    assert _owl_cfg("mlp2x_gelu", -2, "default").tokens_per_image == 16
    assert _owl_cfg("mlp2x_gelu", -2, "full").tokens_per_image == 17
    clip_l_336 = ["model.vision.image_size=336", "model.vision.num_layers=24"]
    assert load_config("configs/model/tiny_llava.yaml", clip_l_336).model.tokens_per_image == 576


@pytest.mark.parametrize("override, message", [
    ("model.connector=mlp2x_relu", "model.connector: 'mlp2x_relu' is not one of abstractor, linear, mlp{N}x_gelu"),
    ("model.vision_feature_select_strategy=patch", "vision_feature_select_strategy: 'patch' is not one of"),
    ("model.vision_feature_layer=[-2,7]", "vision_feature_layer [7] out of range for a 3-layer tower"),
    ("model.connector=identity", "identity passes the vision features through unchanged"),
    ("model.vision.hidden_act=relu", "model.vision.hidden_act: 'relu' is not one of quick_gelu"),
])
def test_config_mistakes_fail_at_load_time(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace("{", r"\{")
                       .replace("}", r"\}")):
        load_config("configs/model/tiny_llava.yaml", [override])


def test_abstractor_with_a_layer_list_is_refused():
    with pytest.raises(ConfigError, match="abstractor.hidden_size .64. must equal"):
        load_config("configs/model/tiny.yaml", ["model.vision_feature_layer=[-1,-2]"])


def test_any_mlp_depth_and_identity_build_without_new_code():
    for connector, depth in (("mlp3x_gelu", 3), ("identity", 0)):
        cfg = _owl_cfg(connector, -2, "default", **({"vision.hidden_size": 96} if connector == "identity" else {}))
        model = build_model(cfg)
        names = sorted(k for k in canonical_shapes(model) if k.startswith("projector."))
        assert names == sorted(f"projector.linear_{i}.{p}" for i in range(1, depth + 1) for p in ("bias", "kernel"))
        out = nnx.jit(lambda m, x: m.encode_images(x))(model, jnp.ones((2, 56, 56, 3)))
        assert out.shape == (2, 16, 96)


def test_every_new_parameter_has_logical_axes():
    model = build_model(_owl_cfg("mlp2x_gelu", [1, -2], "default"))
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = var.get_metadata().get("out_sharding")
        assert names and len(names) == len(var.shape) and any(n is not None for n in names), path


# --------------------------------------------------------------------------------------------------
# B: parity with LlavaForConditionalGeneration
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_llava_logits_parity(hf_cases, name):
    case = hf_cases[name]
    cfg, model = _loaded(case)
    assert cfg.tokens_per_image == case["tpi"]
    logits = _logits(model, cfg, case["ours"], case["pixels"])
    err = max_err(logits, case["logits"])
    print(f"llava parity {name}: max abs err {err:.3g}")
    np.testing.assert_allclose(logits, case["logits"], atol=ATOL, rtol=0)
    # the images matter: the text-only row's logits would not see a wrong vision side
    assert np.abs(case["logits"][:2]).max() > 1.0


def test_llava_parity_scanned_layers(hf_cases):
    """Scanned stacks run only the selected prefix of the tower the same way."""
    case = hf_cases["mlp2x_list_full"]
    cfg, model = _loaded(case, scan=True)
    np.testing.assert_allclose(_logits(model, cfg, case["ours"], case["pixels"]), case["logits"], atol=ATOL, rtol=0)


def test_llava_parity_detects_a_post_layernorm(hf_cases):
    """Sensitivity: the mPLUG-Owl habit (post-LayerNorm on the features) must not pass parity."""
    case = hf_cases["mlp2x_layer-2_default"]
    cfg = dataclasses.replace(case["cfg"], vision_feature_post_layernorm=True)
    model = build_model(cfg)
    llava.load_llava(model, cfg, case["dir"])
    assert max_err(_logits(model, cfg, case["ours"], case["pixels"])[:2], case["logits"][:2]) > 1e-2


# --------------------------------------------------------------------------------------------------
# C: weights in and out
# --------------------------------------------------------------------------------------------------


def test_config_json_reads_as_the_model_config(hf_cases):
    for name in ("mlp2x_layer-2_default", "mlp2x_list_full"):
        case = hf_cases[name]
        got = llava.read_llava_config(case["dir"])
        want = case["cfg"]
        for field in ("vision", "text", "connector", "vision_feature_layer", "vision_feature_select_strategy",
                      "projector_bias"):
            assert getattr(got, field) == getattr(want, field), field
        assert got.image_token_index == IMAGE_TOKEN and got.tokens_per_image == case["tpi"]


def test_legacy_keys_import(hf_cases, tmp_path):
    """Hub llava-hf checkpoints saved by transformers < 4.52: `language_model.model.*`,
    `vision_tower.vision_model.*` (with the `position_ids` buffer), `multi_modal_projector.*`,
    `language_model.lm_head.*`."""
    from safetensors.torch import save_file
    case = hf_cases["mlp2x_layer-2_default"]
    legacy = {}
    for k, v in case["model"].state_dict().items():
        k = (k.replace("model.language_model.", "language_model.model.")
             .replace("model.vision_tower.", "vision_tower.vision_model.")
             .replace("model.multi_modal_projector.", "multi_modal_projector.")
             .replace("lm_head.", "language_model.lm_head."))
        legacy[k] = v.contiguous()
    legacy["vision_tower.vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    save_file(legacy, str(tmp_path / "model.safetensors"))
    cfg, model = _loaded(case, tmp_path)
    np.testing.assert_allclose(_logits(model, cfg, case["ours"], case["pixels"]), case["logits"], atol=ATOL, rtol=0)


def _original_state(case) -> dict:
    """The case's weights as the original LLaVA repository saves `LlavaLlamaForCausalLM` (no tower)."""
    out = {}
    for k, v in case["model"].state_dict().items():
        if k.startswith("model.language_model."):
            out["model." + k[len("model.language_model."):]] = v.clone()
        elif k.startswith("lm_head."):
            out[k] = v.clone()
        elif k.startswith("model.multi_modal_projector."):
            rest = k[len("model.multi_modal_projector."):]
            i, leaf = int(rest.split(".")[0][len("linear_"):]), rest.split(".")[1]
            out[f"model.mm_projector.{2 * (i - 1)}.{leaf}"] = v.clone()
    return out


def test_original_llava_layout_and_stage1_projector_import(hf_cases, tmp_path):
    """The original repository's checkpoint (LLM + `model.mm_projector.{0,2}`, tower named by `mm_vision_tower`)
    and a stage-1 `mm_projector.bin` alone, each with torch.load(weights_only=True)."""
    case = hf_cases["mlp2x_layer-2_default"]
    reference = dict(canonical_params(_loaded(case)[1]))
    state = _original_state(case)
    (tmp_path / "full").mkdir()
    torch.save(state, tmp_path / "full" / "pytorch_model.bin")
    (tmp_path / "full" / "config.json").write_text(json.dumps(
        {"model_type": "llava_llama", "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_hidden_size": 64,
         "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch"}))
    cfg = case["cfg"]
    model = build_model(cfg)
    assert llava.load_llava_checked(model, cfg, tmp_path / "full") == "llava-original"
    got = canonical_params(model)
    for k, v in reference.items():
        same = np.array_equal(np.asarray(got[k]), np.asarray(v))
        assert same == (not k.startswith("vision_model.")), k  # the tower is not in this layout
    projector = {k: v for k, v in state.items() if "mm_projector" in k}
    torch.save(projector, tmp_path / "mm_projector.bin")
    fresh = build_model(cfg)
    assert llava.load_llava(fresh, cfg, tmp_path / "mm_projector.bin") == "mm-projector"
    got = canonical_params(fresh)
    for k, v in reference.items():
        assert np.array_equal(np.asarray(got[k]), np.asarray(v)) == k.startswith("projector."), k
    # an original config that disagrees with the model is refused by name
    with pytest.raises(CheckpointMismatchError, match="mm_vision_select_layer|vision_feature_layer"):
        llava.check_original_config({"mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -1}, cfg, "x")


def test_original_linear_projector_keys():
    assert llava._original_projector_key("model.mm_projector.weight") == "projector.linear_1.weight"
    assert llava._original_projector_key("model.mm_projector.2.bias") == "projector.linear_2.bias"
    assert llava._original_projector_key("model.mm_projector.1.weight") is None  # GELU has no weights


def test_wrong_checkpoints_are_refused_before_loading(hf_cases):
    case = hf_cases["mlp2x_layer-2_default"]
    cfg = _owl_cfg("mlp2x_gelu", -2, "default", **{"text.hidden_size": 128})
    model = build_model(cfg)
    before = {k: np.asarray(v) for k, v in canonical_params(model).items()}
    with pytest.raises(StateMismatchError, match="mis-shaped: language_model.embed_tokens"):
        llava.load_llava(model, cfg, case["dir"])
    assert all(np.array_equal(before[k], np.asarray(v)) for k, v in canonical_params(model).items())
    with pytest.raises(CheckpointMismatchError, match="LLaVA projector"):
        llava.load_llava(build_model(load_config("configs/model/tiny.yaml").model),
                         load_config("configs/model/tiny.yaml").model, case["dir"])


@pytest.mark.parametrize("connector, layer, strategy", [("mlp2x_gelu", -2, "default"), ("linear", [1, -2], "full")])
def test_export_loads_in_transformers_and_round_trips(connector, layer, strategy, tmp_path):
    from transformers import LlavaForConditionalGeneration
    from owl_jax.export import export_model
    cfg = _owl_cfg(connector, layer, strategy)
    model = random_model(cfg, seed=3)
    export_model(model, cfg, tmp_path, "llava-hf", dtype="float32")
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path, local_files_only=True).eval()
    assert hf.config.image_seq_length == cfg.tokens_per_image
    assert (tmp_path / "processor_config.json").is_file() and (tmp_path / "preprocessor_config.json").is_file()
    ids, ours, pixels = _inputs(cfg.tokens_per_image)
    ids[ids == IMAGE_TOKEN] = llava.image_token_index(cfg)
    with torch.no_grad():
        want = hf(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(pixels)).logits.numpy()
    got = _logits(model, cfg, ours, pixels)
    print(f"llava-hf export {connector}: max abs err {max_err(got, want):.3g}")
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    # import(export(x)) == x, bit for bit, from the directory's own config.json
    read = llava.read_llava_config(tmp_path)
    assert read.connector == connector and read.tokens_per_image == cfg.tokens_per_image
    back = build_model(read)
    llava.load_llava(back, read, tmp_path)
    theirs, mine = canonical_params(back), canonical_params(model)
    assert sorted(theirs) == sorted(mine)
    assert all(np.asarray(theirs[k]).tobytes() == np.asarray(mine[k]).tobytes() for k in mine)


def test_export_refuses_what_llava_hf_cannot_express(tmp_path):
    from owl_jax.export import ExportError, export_model
    for cfg in (_owl_cfg("mlp3x_gelu", -2, "default"), load_config("configs/model/tiny.yaml").model):
        with pytest.raises((ExportError, CheckpointMismatchError)):
            export_model(build_model(cfg), cfg, tmp_path / cfg.connector, "llava-hf")


# --------------------------------------------------------------------------------------------------
# Training stages, sharding, FLOPs with a LLaVA connector (no special cases outside the model package)
# --------------------------------------------------------------------------------------------------


# configs/model/tiny_llava.yaml on top of the tiny training recipe
TINY_LLAVA = ["model.connector=mlp2x_gelu", "model.vision_feature_layer=-2",
              "model.vision_feature_select_strategy=default", "model.vision.num_layers=3",
              "model.vision.layer_norm_eps=1e-5"]


def _train_cfg(stage: str, *extra):
    cfg = load_config("configs/tiny_test.yaml", [*TINY_LLAVA, f"training.stage={stage}", *extra])
    if not extra:
        assert cfg.model == load_config("configs/model/tiny_llava.yaml").model
    return cfg


def test_stage1_trains_the_projector_only_on_a_mesh():
    """`pretrain` on a LLaVA model is LLaVA stage 1: the projector trains, the tower and the LLM stay
    bit-identical; sharded over 4 devices it equals one device."""
    import jax
    from owl_jax.sharding import make_mesh
    from owl_jax.training.train_step import create_trainer
    cfg = _train_cfg("pretrain")
    batch = image_train_batch(cfg)
    results = []
    for shape in ((1, 1, 1), (1, 2, 2)):
        c = dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, data=shape[0], fsdp=shape[1], tensor=shape[2]))
        trainer = create_trainer(c, make_mesh(c.mesh, jax.devices()[:int(np.prod(shape))]), batch_example=batch)
        want = sorted(f"projector.linear_{i}.{p}" for i in (1, 2) for p in ("bias", "kernel"))
        assert sorted(trainer.trainable) == want
        before = {k: np.asarray(v) for k, v in canonical_params(trainer.model()).items()}
        losses = [float(jax.device_get(trainer.step(trainer.put_batch(batch)))["loss"]) for _ in range(2)]
        after = {k: np.asarray(v) for k, v in canonical_params(trainer.model()).items()}
        changed = sorted(k for k in before if not np.array_equal(before[k], after[k]))
        assert changed == sorted(trainer.trainable)
        results.append((losses, after))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-5)
    for k, v in results[0][1].items():
        np.testing.assert_allclose(results[1][1][k], v, atol=1e-5, err_msg=k)


def test_stage1_with_the_identity_connector_fails_clearly():
    import jax
    from owl_jax.sharding import make_mesh
    from owl_jax.training.stages import StageError
    from owl_jax.training.train_step import abstract_train_state
    cfg = _train_cfg("pretrain", "model.connector=identity", "model.vision.hidden_size=96")
    with pytest.raises(StageError, match="identity connector has no parameters"):
        abstract_train_state(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))


@pytest.mark.parametrize("stage", ["pretrain", "instruct_lora"])
def test_compiled_step_flops_match_the_analytic_count(stage):
    """As tests/test_flops.py for mPLUG-Owl: a frozen tower costs forward only, the projector's first layer
    no input gradient, and the unused last tower layer nothing."""
    import jax
    from owl_jax.flops import compiled_flops, step_flops
    from owl_jax.sharding import make_mesh
    from owl_jax.training.train_step import abstract_train_state, make_step_function
    cfg = _train_cfg(stage, "model.vision.hidden_size=256", "model.vision.intermediate_size=1024",
                     "model.text.hidden_size=512", "model.text.intermediate_size=1024", "model.text.vocab_size=2048",
                     "model.loss_chunk_size=0", "model.lora.rank=4", "mesh.fsdp=1")
    batch = image_train_batch(cfg, rows=8, seq=128, images=(1, 2, 0, 1, 1, 0, 2, 1), budget=8)
    graphdef, abstract_state, _, schedule, _ = abstract_train_state(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))
    step = make_step_function(graphdef, cfg, schedule)
    compiled = jax.jit(step).lower(abstract_state, {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
                                                    for k, v in batch.items()}).compile()
    analytic = step_flops(cfg.model, stage, tokens=8 * 128, seq_len=128, images=8, causal_halving=False)
    ratio = compiled_flops(compiled) / analytic.total
    assert 0.97 < ratio < 1.05, f"{stage}: compiled/analytic = {ratio:.4f} ({analytic})"


def test_kv_cache_generation_equals_transformers_generate(hf_cases):
    """Greedy KV-cache generation (`owl_jax.generate.Generator`) of a LLaVA model with one and two images
    equals transformers' `generate` on the same LlavaForConditionalGeneration."""
    from data_pipelines.tokenizers import load_tokenizer
    from owl_jax.generate import GenerationSettings, Generator, Prompt
    case = hf_cases["mlp2x_layer-2_default"]
    cfg, model = _loaded(case)
    model.eval()
    generator = Generator(model, load_tokenizer("toy:512"), tokens_per_image=cfg.tokens_per_image,
                          image_size=cfg.vision.image_size)
    rows, prompts = [(0, 12 + 16), (1, 40)], []
    for row, length in rows:
        n = int(NUM_IMAGES[row])
        first = int(NUM_IMAGES[:row].sum())
        pixels = case["pixels"][first:first + n].transpose(0, 2, 3, 1)
        prompts.append(Prompt(case["ours"][row, :length].copy(), pixels))
    ours = generator.generate(prompts, GenerationSettings(max_new_tokens=8, stop_at_eos=False))
    for (row, length), got in zip(rows, ours):
        n = int(NUM_IMAGES[row])
        first = int(NUM_IMAGES[:row].sum())
        ids = torch.from_numpy(case["ids"][row:row + 1, :length])
        with torch.no_grad():
            out = case["model"].generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                         pixel_values=torch.from_numpy(case["pixels"][first:first + n]),
                                         max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
        assert got.tokens == out[0, length:].tolist()
