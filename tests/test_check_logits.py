"""`python -m owl_jax.check_logits` and inference from llava-hf directories.

A tiny llava-hf directory made by transformers passes against itself; a copy with perturbed projector weights
fails against the original, naming the weights; a training run of the tiny LLaVA model passes against its
`--format llava-hf` export, and `owl_jax.generate` answers the same from the run and from the export (the
export is prompted in the family's template, vicuna_v1, as the run was trained). User mistakes exit 2 with
one line.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flax import nnx  # noqa: E402

from owl_jax.check_logits import main  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIP_KW = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4, image_size=56,
               patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5)
LLAMA_KW = dict(vocab_size=512, hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False)
LLAVA_OVERRIDES = ["model.connector=mlp2x_gelu", "model.vision_feature_layer=-2",
                   "model.vision_feature_select_strategy=default", "model.vision.num_layers=3",
                   "model.vision.layer_norm_eps=1e-5"]


@pytest.fixture(scope="module")
def hf_llava(tmp_path_factory):
    """A llava-hf directory saved by transformers (random weights, no tokenizer) and a copy whose projector's
    first weight is perturbed."""
    from helpers import randomize_
    from safetensors.torch import load_file, save_file
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    config = LlavaConfig(vision_config=CLIPVisionConfig(**CLIP_KW).to_dict() | {"model_type": "clip_vision_model"},
                         text_config=LlamaConfig(**LLAMA_KW).to_dict() | {"model_type": "llama"},
                         image_token_index=511, vision_feature_layer=-2, vision_feature_select_strategy="default",
                         image_seq_length=16, projector_hidden_act="gelu")
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    randomize_(model, seed=1)
    root = tmp_path_factory.mktemp("check")
    model.save_pretrained(root / "llava", safe_serialization=True)
    shutil.copytree(root / "llava", root / "perturbed")
    weights = root / "perturbed" / "model.safetensors"
    tensors = load_file(str(weights))
    key = next(k for k in tensors if k.endswith("multi_modal_projector.linear_1.weight"))  # (saved in legacy keys)
    tensors[key] = tensors[key] + 0.05 * torch.randn(tensors[key].shape, generator=torch.Generator().manual_seed(2))
    save_file(tensors, str(weights), metadata={"format": "pt"})
    return root


@pytest.fixture(scope="module")
def llava_run(tmp_path_factory):
    """A training run of the tiny LLaVA model (vicuna_v1 template, SentencePiece tokenizer; random weights saved
    by the train CLI's CheckpointStore), its float32 llava-hf export and an image."""
    from PIL import Image

    from data_pipelines.synthetic import train_tokenizer
    from data_pipelines.templates import VICUNA_V1_SYSTEM
    from helpers import random_canonical_params
    from owl_jax.checkpoint import CheckpointStore
    from owl_jax.config import load_config
    from owl_jax.convert.state import assign_canonical_params, canonical_shapes
    from owl_jax.export import main as export_main
    from owl_jax.sharding import make_mesh
    from owl_jax.training.train_step import abstract_train_state

    root = tmp_path_factory.mktemp("llava_run")
    lines = [VICUNA_V1_SYSTEM, "USER: what is in the picture? ASSISTANT: a red circle on the left", "a green square"]
    (root / "spm.model").write_bytes(train_tokenizer(lines * 40, 300))
    cfg = load_config(os.path.join(ROOT, "configs/tiny_test.yaml"), [
        *LLAVA_OVERRIDES, f"data.tokenizer={root / 'spm.model'}", "data.template=vicuna_v1",
        f"training.output_dir={root / 'run'}", "mesh.fsdp=1"])
    graphdef, abstract, shardings, _, _ = abstract_train_state(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))

    def zeros(x, sharding):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.device_put(jax.random.wrap_key_data(np.zeros(x.shape + (2,), np.uint32)), sharding)
        return jax.device_put(np.zeros(x.shape, x.dtype), sharding)

    state = nnx.merge(graphdef, jax.tree.map(zeros, abstract, shardings))
    assign_canonical_params(state.model, random_canonical_params(canonical_shapes(state.model), seed=4))
    store = CheckpointStore(root / "run", cfg, tokenizer_path=cfg.data.tokenizer)
    store.save(1, nnx.state(state), data_state={}, force=True)
    store.close()
    assert export_main(["--checkpoint", str(root / "run"), "--format", "llava-hf", "--out", str(root / "export"),
                        "--dtype", "float32"]) == 0
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(root / "a.png")
    return root


def _run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_passes_on_a_llava_hf_directory_made_by_transformers(hf_llava, capsys):
    code, out, err = _run(capsys, "--checkpoint", hf_llava / "llava")
    assert code == 0, out + err
    assert "LlavaForConditionalGeneration" in out and "PASS" in out and "1 image x 16 slots" in out
    diff = float(out.split("max abs logit difference ")[1].split()[0])
    assert diff < 1e-4


def test_fails_on_perturbed_projector_weights_and_names_them(hf_llava, capsys):
    code, out, err = _run(capsys, "--checkpoint", hf_llava / "perturbed", "--reference", hf_llava / "llava")
    assert code == 1, out + err
    assert "FAIL: max abs logit difference" in out
    named = out.split("weights that differ from the reference's: ")[1]
    assert named.startswith("projector.linear_1.kernel") and "," not in named.strip()  # that weight alone


def test_a_run_passes_against_its_llava_hf_export(llava_run, capsys):
    code, out, err = _run(capsys, "--checkpoint", llava_run / "run", "--reference", llava_run / "export")
    assert code == 0, out + err
    code, out, err = _run(capsys, "--checkpoint", llava_run / "run", "--reference", llava_run / "export",
                          "--images", llava_run / "a.png", "--prompt", "what is in the picture?")
    assert code == 0 and "--prompt in the vicuna_v1 template" in out and "PASS" in out, out + err


def test_generation_from_the_export_equals_generation_from_the_run(llava_run, capsys):
    from owl_jax.generate import main as generate
    from owl_jax.loading import load_for_inference
    exported = load_for_inference(llava_run / "export")
    assert exported.kind == "llava-hf" and exported.config.data.template == "vicuna_v1"
    answers = []
    for path in (llava_run / "run", llava_run / "export"):
        assert generate(["--checkpoint", str(path), "--image", str(llava_run / "a.png"), "--prompt",
                         "what is in the picture?", "--max-new-tokens", "6"]) == 0
        answers.append(capsys.readouterr().out)
    assert answers[0] == answers[1] and answers[0].strip()


def test_a_text_only_llama_directory(tmp_path, capsys):
    from helpers import randomize_
    config = transformers.LlamaConfig(**LLAMA_KW)
    model = transformers.LlamaForCausalLM(config).eval()
    randomize_(model, seed=5)
    model.save_pretrained(tmp_path / "llama")
    code, out, err = _run(capsys, "--checkpoint", tmp_path / "llama")
    assert code == 0 and "LlamaForCausalLM" in out and "PASS" in out, out + err


def test_user_mistakes_exit_2_in_one_line(hf_llava, llava_run, golden_dir, tmp_path, capsys):
    cases = [
        (["--checkpoint", tmp_path / "nowhere"], "does not exist"),
        (["--checkpoint", golden_dir / "mplug_owl_tiny"], "no transformers class"),
        (["--checkpoint", llava_run / "run"], "pass an HF directory as --reference"),
        (["--checkpoint", hf_llava / "llava", "--images", tmp_path / "missing.png"], "not found"),
        (["--checkpoint", hf_llava / "llava", "--atol", "0"], "--atol must be positive"),
        (["--checkpoint", hf_llava / "llava", "--prompt", "hi"], "pass --tokenizer"),
    ]
    for args, message in cases:
        code, out, err = _run(capsys, *args)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (args, out, err)


def test_an_original_llava_directory_loads_for_inference_and_checks(hf_llava, capsys):
    """The original LLaVA repository layout (LLM + `model.mm_projector.{0,2}`, a LLaMA config with `mm_*` keys,
    the tower a CLIP directory named by `mm_vision_tower`, here relative to the checkpoint) loads with the
    weights of the llava-hf directory it was made from, is prompted in vicuna_v1, and checks against it."""
    from transformers import LlavaForConditionalGeneration

    from owl_jax.convert.state import canonical_params
    from owl_jax.loading import load_for_inference
    hf = LlavaForConditionalGeneration.from_pretrained(hf_llava / "llava", local_files_only=True)
    target = hf_llava / "original"
    hf.model.vision_tower.save_pretrained(target / "clip")
    state = {}
    for k, v in hf.state_dict().items():
        if k.startswith("model.language_model."):
            state["model." + k[len("model.language_model."):]] = v.clone()
        elif k.startswith("lm_head."):
            state[k] = v.clone()
        elif k.startswith("model.multi_modal_projector.linear_"):
            i, leaf = k[len("model.multi_modal_projector.linear_"):].split(".")
            state[f"model.mm_projector.{2 * (int(i) - 1)}.{leaf}"] = v.clone()
    torch.save(state, target / "pytorch_model.bin")
    (target / "config.json").write_text(json.dumps({
        **transformers.LlamaConfig(**LLAMA_KW).to_dict(), "model_type": "llava_llama",
        "architectures": ["LlavaLlamaForCausalLM"], "mm_vision_tower": "clip", "mm_hidden_size": 64,
        "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch"}))
    original = load_for_inference(target, require_tokenizer=False)
    reference = load_for_inference(hf_llava / "llava", require_tokenizer=False)
    assert original.kind == "llava-original" and original.config.data.template == "vicuna_v1"
    got, want = canonical_params(original.model), canonical_params(reference.model)
    assert sorted(got) == sorted(want) and all(np.array_equal(got[k], want[k]) for k in want)
    code, out, err = _run(capsys, "--checkpoint", target, "--reference", hf_llava / "llava")
    assert code == 0 and "PASS" in out, out + err
    code, out, err = _run(capsys, "--checkpoint", target)
    assert code == 2 and "original LLaVA checkpoint has no transformers class" in err
    os.rename(target / "clip", target / "tower")  # a tower that is not there: one line naming what to do
    code, out, err = _run(capsys, "--checkpoint", target, "--reference", hf_llava / "llava")
    assert code == 2 and "vision tower 'clip' is not a local directory" in err, err


@pytest.fixture(scope="module")
def hf_blip2(tmp_path_factory):
    """blip2-hf and instructblip-hf directories saved by transformers (tiny random configs of
    tests/test_blip2.py), and an InstructBLIP copy whose `language_projection.weight` is perturbed."""
    from safetensors.torch import load_file, save_file
    from test_blip2 import _hf_model
    root = tmp_path_factory.mktemp("check_blip2")
    for i, kind in enumerate(("blip2", "instructblip")):
        _hf_model(kind, seed=40 + i).save_pretrained(root / kind, safe_serialization=True)
    shutil.copytree(root / "instructblip", root / "perturbed")
    weights = root / "perturbed" / "model.safetensors"
    tensors = load_file(str(weights))
    key = "language_projection.weight"
    tensors[key] = tensors[key] + 0.05 * torch.randn(tensors[key].shape, generator=torch.Generator().manual_seed(3))
    save_file(tensors, str(weights), metadata={"format": "pt"})
    return root


@pytest.mark.parametrize("kind,cls", [("blip2", "Blip2ForConditionalGeneration"),
                                      ("instructblip", "InstructBlipForConditionalGeneration")])
def test_blip2_family_directories_pass_and_a_perturbed_copy_fails(hf_blip2, kind, cls, capsys):
    code, out, err = _run(capsys, "--checkpoint", hf_blip2 / kind)
    assert code == 0, out + err
    assert cls in out and "PASS" in out and "1 image x 8 slots" in out
    assert ("random Q-Former instruction ids" in out) == (kind == "instructblip")
    assert float(out.split("max abs logit difference ")[1].split()[0]) < 1e-4
    if kind == "instructblip":
        code, out, err = _run(capsys, "--checkpoint", hf_blip2 / "perturbed", "--reference", hf_blip2 / kind)
        assert code == 1, out + err
        named = out.split("weights that differ from the reference's: ")[1]
        assert named.startswith("qformer.language_projection.kernel") and "," not in named.strip()


def test_instructblip_prompt_reaches_the_qformer(hf_blip2, tmp_path, capsys):
    """With --prompt, InstructBLIP's Q-Former reads the prompt's WordPiece ids (the directory's
    `qformer_tokenizer/`) on both sides, as generation gives them, instead of random ids."""
    directory = tmp_path / "instructblip"
    shutil.copytree(hf_blip2 / "instructblip", directory)
    (directory / "qformer_tokenizer").mkdir()
    (directory / "qformer_tokenizer" / "vocab.txt").write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "what", "colour", "is", "it"]) + "\n")
    code, out, err = _run(capsys, "--checkpoint", directory, "--tokenizer", "toy:512", "--prompt", "what colour is it")
    assert code == 0, out + err
    assert "the Q-Former reading --prompt (6 WordPiece ids)" in out and "PASS" in out
