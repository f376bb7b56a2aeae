"""The BLIP-2 family: parity with transformers (PyTorch, CPU, float32, tiny random configs) for
`Blip2VisionModel`, `Blip2QFormerModel`, `InstructBlipQFormerModel`, `Blip2ForConditionalGeneration` and
`InstructBlipForConditionalGeneration` with a LLaMA language model (transformers accepts any causal LM as
`text_config`), the two weight layouts in and out, MiniGPT-4's projection checkpoint, and the Q-Former as a
connector of the training stages.

The tiny configs are `configs/model/tiny_blip2.yaml` / `tiny_instructblip.yaml`: a 2-layer BLIP-2 ViT, a 4-layer
Q-Former cross-attending in layers 0 and 2, 8 queries, LLaMA of tiny.yaml. Every torch parameter is redrawn
(`helpers.randomize_`), including the k third of the vision `qkv.bias` that BLIP-2 never uses: the outputs
must not depend on it, and owl-jax drops it.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from owl_jax.config import ConfigError, load_config  # noqa: E402
from owl_jax.convert import blip2  # noqa: E402
from owl_jax.convert.keymap import CheckpointMismatchError  # noqa: E402
from owl_jax.convert.state import canonical_params  # noqa: E402
from owl_jax.models.owl import build_model  # noqa: E402
from owl_jax.models.splice import plan_image_slots  # noqa: E402
from helpers import image_train_batch, max_err, random_model, randomize_  # noqa: E402

ATOL = 1e-4
VOCAB, IMAGE_TOKEN, QUERIES = 512, 511, 8
VISION_KW = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, image_size=56,
                 patch_size=14, hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True)
QFORMER_KW = dict(hidden_size=48, num_hidden_layers=4, num_attention_heads=4, intermediate_size=96, vocab_size=128,
                  max_position_embeddings=32, cross_attention_frequency=2, layer_norm_eps=1e-12, hidden_act="gelu")
LLAMA_KW = dict(vocab_size=VOCAB, hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False)
SEQ = 40
NUM_IMAGES = np.array([1, 2, 0])  # rows: one image, two images, text only
CONFIGS = {"blip2": "configs/model/tiny_blip2.yaml", "instructblip": "configs/model/tiny_instructblip.yaml"}


def _hf_model(kind: str, seed: int):
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, InstructBlipConfig,
                              InstructBlipForConditionalGeneration, LlamaConfig)
    config_cls, model_cls = ((Blip2Config, Blip2ForConditionalGeneration) if kind == "blip2"
                             else (InstructBlipConfig, InstructBlipForConditionalGeneration))
    config = config_cls(vision_config=VISION_KW, qformer_config=QFORMER_KW,
                        text_config=LlamaConfig(**LLAMA_KW).to_dict(), num_query_tokens=QUERIES,
                        image_token_index=IMAGE_TOKEN)
    config._attn_implementation = "eager"
    for sub in (config.vision_config, config.qformer_config, config.text_config):
        sub._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    randomize_(model, seed=seed)
    return model


def _inputs(seed: int = 0):
    """Token rows with image runs (HF: IMAGE_TOKEN ids; owl-jax: -1), NCHW pixels of the 3 images and their
    Q-Former instructions (padded with 0 / mask 0 for transformers, -1 for owl-jax)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 500, size=(3, SEQ)).astype(np.int64)
    ours = ids.copy()
    for row, starts in {0: [5], 1: [2, 4 + QUERIES]}.items():
        for s in starts:
            ids[row, s:s + QUERIES] = IMAGE_TOKEN
            ours[row, s:s + QUERIES] = -1
    pixels = rng.normal(size=(3, 3, 56, 56)).astype(np.float32)
    lengths = [6, 3, 5]
    qids = rng.integers(1, 128, size=(3, 6)).astype(np.int64)
    qmask = (np.arange(6)[None] < np.array(lengths)[:, None]).astype(np.int64)
    qids[qmask == 0] = 0
    return ids, ours.astype(np.int32), pixels, qids, qmask


def _owl_tokens(qids, qmask):
    return np.where(qmask > 0, qids, -1).astype(np.int32)


@nnx.jit
def _owl_logits(model, tokens, pixels, image_index, qformer_tokens):
    return model.logits(tokens, pixel_values=pixels, image_index=image_index, qformer_tokens=qformer_tokens)


def _logits(model, cfg, ours, pixels, qformer_tokens=None):
    index = plan_image_slots(ours, NUM_IMAGES, tokens_per_image=cfg.tokens_per_image, image_budget=4)
    pix = np.zeros((4, 56, 56, 3), np.float32)
    pix[:3] = pixels.transpose(0, 2, 3, 1)
    text = None
    if qformer_tokens is not None:
        text = np.full((4, qformer_tokens.shape[1]), -1, np.int32)
        text[:3] = qformer_tokens
        text = jnp.asarray(text)
    model.eval()
    return np.asarray(_owl_logits(model, jnp.asarray(ours), jnp.asarray(pix), jnp.asarray(index), text))


@pytest.fixture(scope="module")
def hf_cases(tmp_path_factory):
    cases = {}
    for i, kind in enumerate(CONFIGS):
        model = _hf_model(kind, seed=20 + i)
        directory = tmp_path_factory.mktemp(kind)
        model.save_pretrained(directory, safe_serialization=True)
        ids, ours, pixels, qids, qmask = _inputs()
        kwargs = dict(qformer_input_ids=torch.from_numpy(qids), qformer_attention_mask=torch.from_numpy(qmask)) \
            if kind == "instructblip" else {}
        with torch.no_grad():
            logits = model(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(pixels), **kwargs).logits
        cases[kind] = dict(model=model, dir=directory, ids=ids, ours=ours, pixels=pixels, logits=logits.numpy(),
                           qformer_tokens=_owl_tokens(qids, qmask) if kind == "instructblip" else None,
                           qids=qids, qmask=qmask, cfg=load_config(CONFIGS[kind]).model)
    return cases


@pytest.fixture(scope="module")
def loaded(hf_cases):
    """owl-jax models loaded from the transformers directories (unscanned)."""
    out = {}
    for kind, case in hf_cases.items():
        model = build_model(case["cfg"])
        assert blip2.load_blip2(model, case["cfg"], case["dir"]) == f"{kind}-hf"
        model.eval()
        out[kind] = model
    return out


# --------------------------------------------------------------------------------------------------
# A: config
# --------------------------------------------------------------------------------------------------


def test_tiny_configs():
    cfg = load_config(CONFIGS["blip2"]).model
    assert cfg.tokens_per_image == QUERIES and cfg.vision.kind == "blip2" and not cfg.qformer.text_input
    assert load_config(CONFIGS["instructblip"]).model.qformer.text_input
    full = load_config(CONFIGS["blip2"], ["model.qformer.num_queries=32"]).model
    assert full.tokens_per_image == 32


@pytest.mark.parametrize("override, message", [
    ("model.vision.kind=eva", "model.vision.kind: 'eva' is not one of clip, blip2"),
    ("model.qformer.num_layers=3", "num_layers .3. must be a multiple of cross_attention_frequency .2."),
    ("model.qformer.num_heads=5", "model.qformer.hidden_size .48. must be divisible by num_heads .5."),
    ("model.qformer.cross_attention_frequency=0", "model.qformer.cross_attention_frequency must be >= 1"),
    ("model.qformer.hidden_act=relu", "model.qformer.hidden_act: 'relu' is not one of"),
])
def test_config_mistakes_fail_at_load_time(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS["blip2"], [override])


def test_every_new_parameter_has_logical_axes():
    model = build_model(load_config(CONFIGS["instructblip"]).model)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = var.get_metadata().get("out_sharding")
        assert names and len(names) == len(var.shape) and any(n is not None for n in names), path


def test_qformer_tokens_go_to_a_text_reading_qformer_only():
    pixels, text = jnp.zeros((2, 56, 56, 3)), jnp.array([[1, 2, -1], [3, -1, -1]], jnp.int32)
    for path, message in ((CONFIGS["blip2"], "reads no text .model.qformer.text_input"),
                          ("configs/model/tiny_llava.yaml", "the projector connector reads no text")):
        model = build_model(load_config(path).model)
        with pytest.raises(ValueError, match=message):
            model.encode_images(pixels, text)


# --------------------------------------------------------------------------------------------------
# B: parity with transformers
# --------------------------------------------------------------------------------------------------


def test_vision_tower_parity(hf_cases, loaded):
    """`Blip2VisionModel`: every hidden state and the post-LayerNormed `last_hidden_state` (the Q-Former's input)."""
    case = hf_cases["blip2"]
    pixels = torch.from_numpy(case["pixels"])
    with torch.no_grad():
        out = case["model"].vision_model(pixel_values=pixels, output_hidden_states=True)
    tower = loaded["blip2"].vision_model
    ours = nnx.jit(lambda t, x: (t(x), t.hidden_states(x)))(tower, jnp.asarray(case["pixels"].transpose(0, 2, 3, 1)))
    assert len(ours[1]) == len(out.hidden_states) == 3
    for i, (a, b) in enumerate(zip(ours[1], out.hidden_states)):
        np.testing.assert_allclose(np.asarray(a), b.numpy(), atol=ATOL, rtol=0, err_msg=f"hidden state {i}")
    err = max_err(ours[0], out.last_hidden_state.numpy())
    print(f"Blip2VisionModel last_hidden_state: max abs err {err:.3g}")
    np.testing.assert_allclose(np.asarray(ours[0]), out.last_hidden_state.numpy(), atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_qformer_parity(hf_cases, loaded, kind):
    """`Blip2QFormerModel` / `InstructBlipQFormerModel` on random image features (InstructBLIP: with a padded
    instruction per image): the query outputs."""
    case = hf_cases[kind]
    rng = np.random.default_rng(5)
    feats = rng.normal(size=(3, 17, 64)).astype(np.float32)
    hf = case["model"]
    query = hf.query_tokens.expand(3, -1, -1)
    with torch.no_grad():
        if kind == "blip2":
            want = hf.qformer(query_embeds=query, encoder_hidden_states=torch.from_numpy(feats)).last_hidden_state
        else:
            mask = torch.cat([torch.ones(3, QUERIES, dtype=torch.long), torch.from_numpy(case["qmask"])], 1)
            want = hf.qformer(input_ids=torch.from_numpy(case["qids"]), attention_mask=mask, query_embeds=query,
                              encoder_hidden_states=torch.from_numpy(feats)).last_hidden_state[:, :QUERIES]
    qformer = loaded[kind].qformer
    text = None if case["qformer_tokens"] is None else jnp.asarray(case["qformer_tokens"])
    got = np.asarray(nnx.jit(lambda q, f, t: q.encode(f, t))(qformer, jnp.asarray(feats), text))
    print(f"{kind} Q-Former: max abs err {max_err(got, want.numpy()):.3g}")
    np.testing.assert_allclose(got, want.numpy(), atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_conditional_generation_logits_parity(hf_cases, loaded, kind):
    """`Blip2ForConditionalGeneration` / `InstructBlipForConditionalGeneration` logits with a LLaMA LLM, on rows
    with one image, two images and none."""
    case = hf_cases[kind]
    logits = _logits(loaded[kind], case["cfg"], case["ours"], case["pixels"], case["qformer_tokens"])
    print(f"{kind} logits: max abs err {max_err(logits, case['logits']):.3g}")
    np.testing.assert_allclose(logits, case["logits"], atol=ATOL, rtol=0)
    assert np.abs(case["logits"][:2]).max() > 1.0


def test_instruction_matters_and_padding_does_not(hf_cases, loaded):
    """Sensitivity: another instruction changes the image tokens; a longer padding does not."""
    case = hf_cases["instructblip"]
    model, cfg = loaded["instructblip"], case["cfg"]
    text = case["qformer_tokens"]
    base = _logits(model, cfg, case["ours"], case["pixels"], text)
    padded = np.concatenate([text, np.full((3, 4), -1, np.int32)], axis=1)
    np.testing.assert_allclose(_logits(model, cfg, case["ours"], case["pixels"], padded), base, atol=1e-5, rtol=0)
    other = text.copy()
    other[0, 0] = (other[0, 0] + 1) % 128
    assert max_err(_logits(model, cfg, case["ours"], case["pixels"], other)[0], base[0]) > 1e-3


def test_parity_scanned_layers(hf_cases):
    """Scanned Q-Former blocks and tower layers compute the same."""
    case = hf_cases["instructblip"]
    cfg = dataclasses.replace(case["cfg"], scan_layers=True)
    model = build_model(cfg)
    blip2.load_blip2(model, cfg, case["dir"])
    logits = _logits(model, cfg, case["ours"], case["pixels"], case["qformer_tokens"])
    np.testing.assert_allclose(logits, case["logits"], atol=ATOL, rtol=0)


def test_kv_cache_generation_equals_transformers_generate(hf_cases, loaded):
    """Greedy KV-cache generation of a BLIP-2 model (one and two images) equals transformers' `generate`."""
    from data_pipelines.tokenizers import load_tokenizer
    from owl_jax.generate import GenerationSettings, Generator, Prompt
    case, cfg = hf_cases["blip2"], hf_cases["blip2"]["cfg"]
    generator = Generator(loaded["blip2"], load_tokenizer("toy:512"), tokens_per_image=cfg.tokens_per_image,
                          image_size=cfg.vision.image_size)
    rows = [(0, 5 + QUERIES + 4), (1, 30)]
    prompts = []
    for row, length in rows:
        first, n = int(NUM_IMAGES[:row].sum()), int(NUM_IMAGES[row])
        prompts.append(Prompt(case["ours"][row, :length].copy(),
                              case["pixels"][first:first + n].transpose(0, 2, 3, 1)))
    ours = generator.generate(prompts, GenerationSettings(max_new_tokens=6, stop_at_eos=False))
    for (row, length), got in zip(rows, ours):
        first, n = int(NUM_IMAGES[:row].sum()), int(NUM_IMAGES[row])
        ids = torch.from_numpy(case["ids"][row:row + 1, :length])
        with torch.no_grad():
            out = case["model"].generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                         pixel_values=torch.from_numpy(case["pixels"][first:first + n]),
                                         max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
        assert got.tokens == out[0, -6:].tolist()


def test_instructblip_generation_reads_the_instruction_and_equals_transformers_generate(hf_cases, loaded):
    """InstructBLIP: the Q-Former's instruction ids travel with the prompt (`Prompt.qformer_tokens`), and
    greedy KV-cache generation equals transformers' `generate` given the same `qformer_input_ids`."""
    from data_pipelines.tokenizers import load_tokenizer
    from owl_jax.generate import GenerationSettings, Generator, Prompt
    case, cfg = hf_cases["instructblip"], hf_cases["instructblip"]["cfg"]
    generator = Generator(loaded["instructblip"], load_tokenizer("toy:512"), tokens_per_image=cfg.tokens_per_image,
                          image_size=cfg.vision.image_size)
    assert generator.qformer_text_len == cfg.qformer.max_text_len
    rows = [(0, 5 + QUERIES + 4), (1, 30)]
    qformer = [case["qids"][i, :int(case["qmask"][i].sum())].astype(np.int32) for i in range(3)]
    prompts = []
    for row, length in rows:
        first, n = int(NUM_IMAGES[:row].sum()), int(NUM_IMAGES[row])
        prompts.append(Prompt(case["ours"][row, :length].copy(), case["pixels"][first:first + n].transpose(0, 2, 3, 1),
                              qformer_tokens=tuple(qformer[first:first + n])))
    settings = GenerationSettings(max_new_tokens=6, stop_at_eos=False)
    ours = generator.generate(prompts, settings)
    for (row, length), got in zip(rows, ours):
        first, n = int(NUM_IMAGES[:row].sum()), int(NUM_IMAGES[row])
        ids = torch.from_numpy(case["ids"][row:row + 1, :length])
        with torch.no_grad():
            out = case["model"].generate(
                input_ids=ids, attention_mask=torch.ones_like(ids),
                pixel_values=torch.from_numpy(case["pixels"][first:first + n]),
                qformer_input_ids=torch.from_numpy(case["qids"][first:first + n]),
                qformer_attention_mask=torch.from_numpy(case["qmask"][first:first + n]),
                max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
        assert got.tokens == out[0, -6:].tolist()
    # another instruction gives other logits: the ids reach the Q-Former
    other = dataclasses.replace(prompts[0], qformer_tokens=(qformer[2],))
    assert not np.allclose(generator.next_token_logits([other]), generator.next_token_logits(prompts[:1]))
    with pytest.raises(ValueError, match="reads each image's instruction"):
        generator.generate([dataclasses.replace(prompts[0], qformer_tokens=None)], settings)


def test_instructblip_chat_and_loading_find_the_qformer_tokenizer(hf_cases, tmp_path):
    """A loaded InstructBLIP directory takes its `qformer_tokenizer/` (as InstructBlipProcessor saves it), or
    `--qformer-tokenizer`, or refuses to load with one line; a chat session then gives every image the
    question's WordPiece ids, as the training pipeline does."""
    import shutil
    from data_pipelines.tokenizers import WordPieceTokenizer
    from owl_jax.chat import ChatSession
    from owl_jax.loading import LoadError, load_for_inference
    directory = tmp_path / "instructblip"
    shutil.copytree(hf_cases["instructblip"]["dir"], directory)
    with pytest.raises(LoadError, match="--qformer-tokenizer"):
        load_for_inference(directory, tokenizer="toy:512")
    (directory / "qformer_tokenizer").mkdir()
    vocab = directory / "qformer_tokenizer" / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "what", "colour", "is", "it", "?"]) + "\n")
    loaded = load_for_inference(directory, tokenizer="toy:512")
    assert loaded.config.data.qformer_tokenizer == str(directory)
    chat = ChatSession.for_config(loaded.config, loaded.tokenizer)
    chat.add_image(np.zeros((56, 56, 3), np.float32))
    prompt = chat.prompt("What colour is it?")
    want = WordPieceTokenizer(vocab, cfg_len := loaded.config.model.qformer.max_text_len).encode("What colour is it?")
    assert len(prompt.qformer_tokens) == 1 and prompt.qformer_tokens[0].tolist() == want
    assert want[0] == 2 and want[-1] == 3 and len(want) <= cfg_len  # [CLS] ... [SEP]
    chat.record("What colour is it?", "red")
    second = chat.prompt("is it?")  # the image still reads the message that holds it
    assert [t.tolist() for t in second.qformer_tokens] == [want]


# --------------------------------------------------------------------------------------------------
# C: weights in and out
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_config_json_reads_as_the_model_config(hf_cases, kind):
    got = blip2.read_blip2_config(hf_cases[kind]["dir"])
    want = hf_cases[kind]["cfg"]
    for section in ("vision", "text"):
        assert getattr(got, section) == getattr(want, section), section
    assert dataclasses.replace(got.qformer, max_text_len=16) == want.qformer
    assert got.connector == "qformer" and got.image_token_index == IMAGE_TOKEN and got.tokens_per_image == QUERIES


def test_a_config_that_disagrees_is_refused(hf_cases):
    case = hf_cases["blip2"]
    cfg = load_config(CONFIGS["blip2"], ["model.qformer.layer_norm_eps=1e-5", "model.vision.num_heads=8"]).model
    with pytest.raises(CheckpointMismatchError, match="qformer.layer_norm_eps: checkpoint 1e-12, model 1e-05"):
        blip2.load_blip2_checked(build_model(cfg), cfg, case["dir"])
    with pytest.raises(CheckpointMismatchError, match="model.connector qformer"):
        blip2.load_blip2(build_model(load_config("configs/model/tiny.yaml").model),
                         load_config("configs/model/tiny.yaml").model, case["dir"])


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_export_loads_in_transformers_and_round_trips(kind, tmp_path):
    from transformers import Blip2ForConditionalGeneration, InstructBlipForConditionalGeneration
    from owl_jax.export import export_model
    cfg = load_config(CONFIGS[kind]).model
    model = random_model(cfg, seed=3)
    vocab = tmp_path.parent / f"{kind}-vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello"]) + "\n")
    export_model(model, cfg, tmp_path, f"{kind}-hf", dtype="float32", qformer_tokenizer=str(vocab))
    # InstructBLIP's directory carries its Q-Former tokenizer where InstructBlipProcessor saves it
    assert (tmp_path / "qformer_tokenizer" / "vocab.txt").is_file() == (kind == "instructblip")
    cls = Blip2ForConditionalGeneration if kind == "blip2" else InstructBlipForConditionalGeneration
    hf = cls.from_pretrained(tmp_path, local_files_only=True).eval()
    assert hf.config.num_query_tokens == QUERIES
    assert (tmp_path / "preprocessor_config.json").is_file() and (tmp_path / "processor_config.json").is_file()
    ids, ours, pixels, qids, qmask = _inputs(seed=1)
    ids[ids == IMAGE_TOKEN] = blip2.image_token_index(cfg)
    kwargs = dict(qformer_input_ids=torch.from_numpy(qids), qformer_attention_mask=torch.from_numpy(qmask)) \
        if kind == "instructblip" else {}
    with torch.no_grad():
        want = hf(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(pixels), **kwargs).logits.numpy()
    model.eval()
    got = _logits(model, cfg, ours, pixels, _owl_tokens(qids, qmask) if kind == "instructblip" else None)
    print(f"{kind}-hf export: max abs err {max_err(got, want):.3g}")
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    # import(export(x)) == x, bit for bit, from the directory's own config.json
    read = blip2.read_blip2_config(tmp_path, base=cfg)
    assert read == dataclasses.replace(cfg, image_token_index=blip2.image_token_index(cfg))
    back = build_model(read)
    blip2.load_blip2_checked(back, read, tmp_path)
    theirs, mine = canonical_params(back), canonical_params(model)
    assert sorted(theirs) == sorted(mine)
    assert all(np.asarray(theirs[k]).tobytes() == np.asarray(mine[k]).tobytes() for k in mine)


def test_export_refuses_what_the_layout_cannot_express(tmp_path):
    from owl_jax.export import ExportError, export_model
    blip = load_config(CONFIGS["blip2"]).model
    cases = [(blip, "instructblip-hf", "text_input is False: export as blip2-hf"),
             (load_config(CONFIGS["instructblip"]).model, "blip2-hf", "export as instructblip-hf"),
             (load_config("configs/model/tiny.yaml").model, "blip2-hf", "needs qformer"),
             (dataclasses.replace(blip, vision=dataclasses.replace(blip.vision, kind="clip")), "blip2-hf",
              "Blip2VisionModel"),
             (dataclasses.replace(blip, vision_feature_layer=-2), "blip2-hf", "post-LayerNormed last vision layer")]
    for i, (cfg, fmt, message) in enumerate(cases):
        with pytest.raises(ExportError, match=message):
            export_model(build_model(cfg), cfg, tmp_path / str(i), fmt)


def test_non_llama_checkpoint_gives_tower_and_qformer_only(hf_cases, tmp_path):
    """BLIP-2's OPT releases (and Flan-T5): the tower, queries and Q-Former load, the LLM and the projection
    trained for it are left alone (MiniGPT-4 takes them from blip2-flan-t5-xxl)."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, OPTConfig
    opt = OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=2,
                    max_position_embeddings=64, word_embed_proj_dim=32)
    hf = Blip2ForConditionalGeneration(Blip2Config(vision_config=VISION_KW, qformer_config=QFORMER_KW,
                                                   text_config=opt.to_dict(), num_query_tokens=QUERIES)).eval()
    randomize_(hf, seed=7)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    cfg = hf_cases["blip2"]["cfg"]
    model = build_model(cfg)
    before = {k: np.asarray(v) for k, v in canonical_params(model).items()}
    logs = []
    blip2.load_blip2_checked(model, cfg, tmp_path, log=logs.append)
    assert any("OPT language model" in line for line in logs)
    after = canonical_params(model)
    for k, v in before.items():
        unchanged = np.array_equal(v, np.asarray(after[k]))
        assert unchanged == k.startswith(("language_model.", "qformer.language_projection.")), k
    ref = hf.vision_model.post_layernorm.weight.detach().numpy()
    np.testing.assert_array_equal(np.asarray(after["vision_model.post_layernorm.scale"]), ref)


def test_minigpt4_projection_checkpoint(hf_cases, tmp_path):
    """A MiniGPT-4 stage checkpoint (`{"model": {"llama_proj.*"}, "optimizer": ..., "epoch": ...}`, read with
    torch.load(weights_only=True)) sets the projection on top of the BLIP-2 weights and nothing else."""
    case = hf_cases["blip2"]
    cfg = case["cfg"]
    model = build_model(cfg)
    blip2.load_blip2(model, cfg, case["dir"])
    before = {k: np.asarray(v) for k, v in canonical_params(model).items()}
    g = torch.Generator().manual_seed(0)
    proj = {"llama_proj.weight": torch.randn(96, 48, generator=g), "llama_proj.bias": torch.randn(96, generator=g)}
    torch.save({"model": proj, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]}, "epoch": 3,
                "config": {"run": {"task": "image_text_pretrain"}}}, tmp_path / "checkpoint_3.pth")
    assert blip2.load_minigpt4(model, cfg, tmp_path / "checkpoint_3.pth") == 2
    after = canonical_params(model)
    np.testing.assert_array_equal(np.asarray(after["qformer.language_projection.kernel"]), proj["llama_proj.weight"].T)
    np.testing.assert_array_equal(np.asarray(after["qformer.language_projection.bias"]), proj["llama_proj.bias"])
    assert all(np.array_equal(v, np.asarray(after[k])) for k, v in before.items() if "language_projection" not in k)
    torch.save({"model": {"other.weight": torch.zeros(2)}}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointMismatchError, match="no llama_proj.weight"):
        blip2.load_minigpt4(model, cfg, tmp_path / "bad.pth")


# --------------------------------------------------------------------------------------------------
# D: the Q-Former as a connector of the training stages
# --------------------------------------------------------------------------------------------------


def _train_cfg(kind: str, stage: str, *extra):
    """configs/tiny_test.yaml (the tiny training recipe) with the tiny BLIP-2 / InstructBLIP model."""
    from pathlib import Path
    import tempfile
    root = Path(__file__).resolve().parents[1] / "configs"
    with tempfile.TemporaryDirectory() as tmp:
        recipe = Path(tmp) / "recipe.yaml"
        recipe.write_text(f"base: [{root / 'tiny_test.yaml'}, {root / CONFIGS[kind].split('/', 1)[1]}]\n")
        cfg = load_config(recipe, [f"training.stage={stage}", *extra])
    assert extra or cfg.model == load_config(CONFIGS[kind]).model
    return cfg


def test_stage1_trains_the_qformer_only_and_reads_the_instruction_on_a_mesh():
    """`pretrain` with the Q-Former trains `qformer.*` (queries, layers, text embeddings, projection); the tower
    and the LLM stay bit-identical; the batch's `qformer_tokens` reach the loss (their embeddings train);
    sharded over 4 devices (fsdp 2, tensor 2: the Q-Former's heads split) it equals one device."""
    import jax
    from owl_jax.sharding import make_mesh
    from owl_jax.training.train_step import create_trainer
    # Adam's eps 1 makes the step ~lr·g: Adam proper turns a gradient's rounding (different on every mesh) into
    # a full ±lr step where the gradient is ~0, e.g. every key bias (softmax removes the q·b_k it adds).
    cfg = _train_cfg("instructblip", "pretrain", "optimizer.eps=1.0", "model.qformer.num_layers=2",
                     "model.vision.num_layers=1", "model.text.num_layers=1")  # fewer layers: faster compiles
    batch = image_train_batch(cfg)
    results = []
    for shape in ((1, 1, 1), (1, 2, 2)):
        c = dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, data=shape[0], fsdp=shape[1], tensor=shape[2]))
        trainer = create_trainer(c, make_mesh(c.mesh, jax.devices()[:int(np.prod(shape))]), batch_example=batch)
        assert trainer.trainable and all(k.startswith("qformer.") for k in trainer.trainable)
        assert {"qformer.word_embeddings", "qformer.query_tokens", "qformer.language_projection.kernel"} <= set(
            trainer.trainable)
        before = {k: np.asarray(v) for k, v in canonical_params(trainer.model()).items()}
        losses = [float(jax.device_get(trainer.step(trainer.put_batch(batch)))["loss"]) for _ in range(2)]
        after = {k: np.asarray(v) for k, v in canonical_params(trainer.model()).items()}
        changed = sorted(k for k in before if not np.array_equal(before[k], after[k]))
        assert changed and all(k.startswith("qformer.") for k in changed)
        assert "qformer.word_embeddings" in changed  # the batch's instructions reached the loss
        results.append((losses, after))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-5)
    for k, v in results[0][1].items():
        np.testing.assert_allclose(results[1][1][k], v, atol=1e-5, err_msg=k)


@pytest.mark.parametrize("kind, stage", [("instructblip", "pretrain"), ("blip2", "instruct_lora"), ("blip2", "minigpt4")])
def test_compiled_step_flops_match_the_analytic_count(kind, stage):
    """As tests/test_flops.py: the Q-Former's analytic FLOPs (text path included) match the compiled step."""
    import jax
    from owl_jax.flops import compiled_flops, step_flops
    from owl_jax.sharding import make_mesh
    from owl_jax.training.train_step import abstract_train_state, make_step_function
    cfg = _train_cfg(kind, stage, "model.vision.hidden_size=256", "model.vision.intermediate_size=1024",
                     "model.qformer.hidden_size=256", "model.qformer.intermediate_size=512",
                     "model.text.hidden_size=512", "model.text.intermediate_size=1024", "model.text.vocab_size=2048",
                     "model.loss_chunk_size=0", "model.lora.rank=4", "mesh.fsdp=1")
    batch = image_train_batch(cfg, rows=8, seq=128, images=(1, 2, 0, 1, 1, 0, 2, 1), budget=8)
    graphdef, abstract_state, _, schedule, _ = abstract_train_state(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))
    step = make_step_function(graphdef, cfg, schedule)
    compiled = jax.jit(step).lower(abstract_state, {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
                                                    for k, v in batch.items()}).compile()
    analytic = step_flops(cfg.model, stage, tokens=8 * 128, seq_len=128, images=8, causal_halving=False)
    ratio = compiled_flops(compiled) / analytic.total
    print(f"{kind} {stage}: compiled / analytic FLOPs {ratio:.4f}")
    assert 0.97 < ratio < 1.05, f"{kind} {stage}: compiled/analytic = {ratio:.4f} ({analytic})"
