"""Generation (`owl_jax.generate`): KV-cache decoding against full recomputation, the official implementation's
golden generation, transformers `generate` (greedy, penalties, logits processors), left-padded batches,
bounded compiles, LoRA unmerged vs merged, stop strings; the chat CLI and the generation-based evaluation
tasks (OwlEval answers, VQA exact match, caption perplexity) on a tiny training checkpoint.

Models are the golden tiny mPLUG-Owl (tests/fixtures/mplug_owl_v1_tiny) and a tiny random LlamaForCausalLM.
Prompt lengths and new-token counts are chosen to fall into the same buckets, so that compiled code is
shared between tests (the compiled functions are cached per architecture, not per Generator).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from data_pipelines.tokenize import to_prompt
from data_pipelines.tokenizers import load_tokenizer
from owl_jax.compile_counter import count_compiles
from owl_jax.generate import Generation, GenerationSettings, Generator, Prompt, bucket, main
from owl_jax.loading import load_for_inference
from owl_jax.models.splice import plan_image_slots
from owl_jax.sampling import (SamplingParams, apply_repetition_penalty, banned_ngram_tokens,
                              top_k_filter, top_p_filter)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HUMAN, AI = "human", "ai"
GREEDY16 = GenerationSettings(max_new_tokens=16, stop_at_eos=False)


# ---------------------------------------------------------------------------------------------------
# The golden official model
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def golden(golden_dir):
    return dict(np.load(golden_dir / "inputs.npz")), dict(np.load(golden_dir / "outputs.npz"))


@pytest.fixture(scope="module")
def owl(golden_dir):
    loaded = load_for_inference(golden_dir / "mplug_owl_tiny", tokenizer="toy:512")
    return loaded, Generator(loaded.model, loaded.tokenizer, tokens_per_image=9, image_size=56)


def _golden_prompt(golden) -> Prompt:
    inputs, outputs = golden
    return Prompt(inputs["gen_input_ids"][0].astype(np.int32), outputs["proc_pixel_values"].transpose(0, 2, 3, 1))


def test_golden_generation_of_the_official_implementation(owl, golden):
    """meta.json: greedy `generate` (max_new_tokens 5, no sampling, one beam) of the official code on the
    processor's prompt; transformers 4.28 prepends a dummy BOS to the new tokens."""
    loaded, generator = owl
    inputs, outputs = golden
    ids = to_prompt([(HUMAN, "<image>"), (HUMAN, "What is in the picture?")], loaded.tokenizer, 9, images=["a"])
    np.testing.assert_array_equal(ids, inputs["gen_input_ids"][0])  # our template == the official processor's
    prompt = _golden_prompt(golden)
    logits = generator.next_token_logits([prompt])
    np.testing.assert_allclose(logits, outputs["gen_first_step_logits"], atol=2e-5, rtol=1e-5)
    out = generator.generate([prompt], GenerationSettings(max_new_tokens=5))[0]
    assert [loaded.tokenizer.bos_id, *out.tokens] == outputs["gen_sequences"][0].tolist()
    assert out.finish_reason == "length"


@functools.partial(jax.jit, static_argnames="graphdef")
def _full_logits(state, tokens, pixels, index, *, graphdef):
    return nnx.merge(graphdef, state).logits(tokens, pixel_values=pixels, image_index=index)


def _full_forward_greedy(model, prompt: Prompt, steps: int, length: int) -> list[int]:
    """Greedy decoding by recomputing the whole sequence at every step (no cache): one jitted forward on a
    right-padded [1, length] buffer (causal attention: the padding never reaches earlier positions)."""
    graphdef, state = nnx.split(model)
    seq = list(prompt.tokens)
    for _ in range(steps):
        tokens = np.zeros((1, length), np.int32)
        tokens[0, :len(seq)] = seq
        index = plan_image_slots(tokens, np.array([prompt.num_images]), tokens_per_image=9,
                                 image_budget=prompt.num_images)
        logits = _full_logits(state, tokens, prompt.pixels, index, graphdef=graphdef)
        seq.append(int(np.argmax(np.asarray(logits)[0, len(seq) - 1])))
    return seq[len(prompt.tokens):]


def test_kv_cache_greedy_equals_full_recomputation(owl, golden):
    loaded, generator = owl
    prompt = _golden_prompt(golden)
    cached = generator.generate([prompt], GREEDY16)[0].tokens
    assert len(cached) == 16
    assert cached == _full_forward_greedy(loaded.model, prompt, 16, length=80)


def _image_prompts(golden, tokenizer) -> list[Prompt]:
    """Prompts of different lengths, with images (one each, different pictures) and without."""
    pixels = _golden_prompt(golden).pixels
    other = np.random.default_rng(0).normal(size=pixels.shape).astype(np.float32)
    short = to_prompt([(HUMAN, "<image>"), (HUMAN, "Colour?")], tokenizer, 9, images=["b"], system="")
    text = to_prompt([(HUMAN, "Tell me a story about a small red fox.")], tokenizer, 9)
    return [_golden_prompt(golden), Prompt(short, other), Prompt(text)]


def test_left_padded_batch_equals_each_prompt_alone(owl, golden):
    loaded, generator = owl
    prompts = _image_prompts(golden, loaded.tokenizer)
    assert len({len(p.tokens) for p in prompts}) == 3
    batched = generator.generate(prompts, GREEDY16)
    alone = [generator.generate([p], GREEDY16)[0] for p in prompts]
    assert [b.tokens for b in batched] == [a.tokens for a in alone]
    # and the rows really differ (the padding is not hiding a broken batch)
    assert len({tuple(b.tokens) for b in batched}) == 3


def test_lora_unmerged_equals_merged(owl, golden, golden_dir):
    _, base = owl
    prompt = _golden_prompt(golden)
    kw = dict(tokenizer="toy:512", lora=golden_dir / "lora_adapter")
    unmerged = load_for_inference(golden_dir / "mplug_owl_tiny", **kw)
    merged = load_for_inference(golden_dir / "mplug_owl_tiny", merge_lora=True, **kw)
    gens = [Generator(m.model, m.tokenizer, tokens_per_image=9, image_size=56) for m in (unmerged, merged)]
    logits = [g.next_token_logits([prompt]) for g in gens]
    np.testing.assert_allclose(logits[0], logits[1], atol=1e-4)
    assert np.abs(logits[0] - base.next_token_logits([prompt])).max() > 0.1  # the adapter matters
    tokens = [g.generate([prompt], GREEDY16)[0].tokens for g in gens]
    assert tokens[0] == tokens[1]


def test_stop_strings_end_rows_between_calls(owl, golden):
    loaded, generator = owl
    prompt = _golden_prompt(golden)
    full = generator.generate([prompt], GREEDY16)[0]
    text = loaded.tokenizer.decode(full.tokens)
    stop = loaded.tokenizer.decode([full.tokens[5]])  # the toy tokenizer writes unseen ids as "<id>"
    first = next(j for j in range(16) if stop in loaded.tokenizer.decode(full.tokens[:j + 1]))
    generator.steps_per_call = 2  # the host checks the text every 2 steps
    try:
        out = generator.generate([prompt], dataclasses.replace(GREEDY16, stop_strings=(stop,)))[0]
    finally:
        generator.steps_per_call = 32
    assert out.finish_reason == "stop" and out.text == text[:text.index(stop)]
    assert out.tokens == full.tokens[:len(out.tokens)] and first < len(out.tokens) <= first + 2


# ---------------------------------------------------------------------------------------------------
# transformers LlamaForCausalLM
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from helpers import randomize_

    config = transformers.LlamaConfig(vocab_size=512, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                                      attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    randomize_(model, seed=3)
    directory = tmp_path_factory.mktemp("hf_llama")
    model.save_pretrained(directory, safe_serialization=True)
    loaded = load_for_inference(directory, tokenizer="toy:512")
    assert loaded.kind == "hf-llama" and not loaded.has_vision
    generator = Generator(loaded.model, loaded.tokenizer, tokens_per_image=loaded.config.model.tokens_per_image,
                          image_size=loaded.config.model.vision.image_size)
    return model, generator, directory, loaded.config.model


def _hf_generate(model, ids: list[int], **kw) -> list[int]:
    import torch
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=16, pad_token_id=0, eos_token_id=2, **kw)
    new = out[0, len(ids):].tolist()
    return new[:new.index(2)] if 2 in new else new


TEXT_PROMPTS = [[1, 17, 230, 42, 99], [1, 5, 6, 7, 8, 9, 10, 301, 77], [1, 400, 3, 3, 3, 90, 91, 92, 93, 94, 95, 12, 13]]


def test_greedy_equals_transformers_generate(hf_llama):
    model, generator = hf_llama[:2]
    ours = generator.generate([Prompt(np.asarray(p, np.int32)) for p in TEXT_PROMPTS],
                              GenerationSettings(max_new_tokens=16))
    for ids, got in zip(TEXT_PROMPTS, ours):
        assert got.tokens == _hf_generate(model, ids, do_sample=False)


def test_scanned_layers_decode_like_unrolled(hf_llama):
    """The cache path over stacked (scanned) layers: a lax.scan inside the decode loop."""
    _, unrolled, directory, cfg = hf_llama
    model = load_for_inference(directory, tokenizer="toy:512", scan_layers=True).model
    assert model.language_model.layers.scan
    scanned = Generator(model, unrolled.tokenizer, tokens_per_image=cfg.tokens_per_image,
                        image_size=cfg.vision.image_size)
    prompts = [Prompt(np.asarray(p, np.int32)) for p in TEXT_PROMPTS]
    np.testing.assert_allclose(scanned.next_token_logits(prompts), unrolled.next_token_logits(prompts), atol=1e-5)
    assert [g.tokens for g in scanned.generate(prompts, GREEDY16)] == \
        [g.tokens for g in unrolled.generate(prompts, GREEDY16)]


def test_penalties_match_transformers_generate(hf_llama):
    """Repetition penalty and no-repeat-n-gram over prompt + generated tokens (HF semantics)."""
    model, generator = hf_llama[:2]
    settings = GenerationSettings(max_new_tokens=16, sampling=SamplingParams(repetition_penalty=1.5,
                                                                             no_repeat_ngram_size=2,
                                                                             penalize_prompt=True))
    plain = generator.generate([Prompt(np.asarray(p, np.int32)) for p in TEXT_PROMPTS],
                               GenerationSettings(max_new_tokens=16))
    ours = generator.generate([Prompt(np.asarray(p, np.int32)) for p in TEXT_PROMPTS], settings)
    for ids, got in zip(TEXT_PROMPTS, ours):
        assert got.tokens == _hf_generate(model, ids, do_sample=False, repetition_penalty=1.5, no_repeat_ngram_size=2)
        seq = ids + got.tokens
        for i in range(len(ids), len(seq)):  # no generated token completes a bigram seen before it
            assert (seq[i - 1], seq[i]) not in set(zip(seq[:i - 1], seq[1:i]))
    assert any(a.tokens != b.tokens for a, b in zip(ours, plain))  # the penalties changed something


def test_logits_processors_equal_transformers():
    torch = pytest.importorskip("torch")
    from transformers.generation import logits_process as lp

    rng = np.random.default_rng(0)
    scores = rng.normal(size=(4, 40)).astype(np.float32) * 3
    scores[1, :5] = scores[1, 5]  # ties at the k-th value
    history = rng.integers(0, 8, size=(4, 12))  # small alphabet: many repeated n-grams
    ids, s = torch.from_numpy(history), torch.from_numpy(scores)
    top_k, top_p = jax.jit(top_k_filter), jax.jit(top_p_filter)  # one compile each for every k / p
    for k in (0, 1, 3, 10):  # 0 = off
        want = lp.TopKLogitsWarper(top_k=k)(ids, s.clone()).numpy() if k else scores
        np.testing.assert_array_equal(np.asarray(top_k(scores, np.int32(k))), want)
    for p in (0.05, 0.5, 0.9, 1.0):  # 1.0 = off
        want = lp.TopPLogitsWarper(top_p=p)(ids, s.clone()).numpy() if p < 1 else scores
        np.testing.assert_array_equal(np.asarray(top_p(scores, np.float32(p))), want)
    seen = np.zeros_like(scores, bool)
    seen[np.arange(4)[:, None], history] = True
    want = lp.RepetitionPenaltyLogitsProcessor(1.3)(ids, s.clone()).numpy()
    np.testing.assert_allclose(apply_repetition_penalty(scores, seen, np.float32(1.3)), want, rtol=1e-6)
    for n in (2, 3):
        want = np.isinf(lp.NoRepeatNGramLogitsProcessor(n)(ids, s.clone()).numpy())
        got = jax.jit(banned_ngram_tokens, static_argnums=(2, 3))(history.astype(np.int32), 12, n, 40)
        np.testing.assert_array_equal(np.asarray(got), want)


def test_sampling_options(hf_llama):
    generator = hf_llama[1]
    prompts = [Prompt(np.asarray(p, np.int32)) for p in TEXT_PROMPTS]
    greedy = [g.tokens for g in generator.generate(prompts, GenerationSettings(max_new_tokens=16))]

    def sample(seed=0, **kw):
        settings = GenerationSettings(max_new_tokens=16, seed=seed, sampling=SamplingParams(do_sample=True, **kw))
        return [g.tokens for g in generator.generate(prompts, settings)]

    assert sample(top_k=1) == greedy
    assert sample(top_k=1, temperature=3.0, seed=5) == greedy
    assert sample(top_p=1e-6) == greedy  # the nucleus always keeps the most likely token
    free = sample(temperature=2.0)
    assert free != greedy and free == sample(temperature=2.0)  # seeded: reproducible
    assert sample(temperature=2.0, seed=1) != free


def test_each_row_stops_on_its_own_budget(hf_llama):
    """Per-row `Prompt.max_new_tokens`: a row with little room does not shorten the others (which run to
    the batch-wide limit), and every row equals the same prompt generated alone; sampled rows with their
    own seed equal their alone-draws too."""
    generator = hf_llama[1]
    settings = dataclasses.replace(GREEDY16, max_new_tokens=12)
    prompts = [Prompt(np.asarray(p, np.int32), max_new_tokens=m) for p, m in zip(TEXT_PROMPTS, (3, None, 20))]
    batched = generator.generate(prompts, settings)
    assert [len(g.tokens) for g in batched] == [3, 12, 12]
    assert [g.finish_reason for g in batched] == ["length"] * 3
    assert [g.tokens for g in batched] == [generator.generate([p], settings)[0].tokens for p in prompts]
    sampled = dataclasses.replace(settings, sampling=SamplingParams(do_sample=True, temperature=2.0))
    seeded = [dataclasses.replace(p, seed=100 + i) for i, p in enumerate(prompts)]
    together = [g.tokens for g in generator.generate(seeded, sampled)]
    assert together == [generator.generate([p], sampled)[0].tokens for p in seeded]
    assert [g.tokens for g in generator.generate(seeded[::-1], sampled)][::-1] == together  # any place in the batch
    assert generator.generate([dataclasses.replace(seeded[2], seed=7)], sampled)[0].tokens != together[2]


def test_compiles_bounded_across_prompt_lengths(hf_llama):
    """Prompts of 2..64 tokens in batches of 3 share one prefill and one decode executable (none at all
    when an earlier test compiled that bucket); longer prompts go to a handful of larger buckets."""
    generator = hf_llama[1]
    rng = np.random.default_rng(1)
    with count_compiles() as compiles:
        for lengths in [(3, 20, 41), (10, 64, 30), (2, 5, 7), (33, 63, 9)]:
            prompts = [Prompt(rng.integers(3, 500, n).astype(np.int32)) for n in lengths]
            generator.generate(prompts, GenerationSettings(max_new_tokens=int(rng.integers(1, 17))))
    assert compiles["jit(_prefill)"] <= 1 and compiles["jit(_decode)"] <= 1, dict(compiles.counts)
    assert [bucket(n, minimum=64) for n in (1, 64, 65, 128, 129, 256, 257, 600, 2048)] == \
        [64, 64, 128, 128, 256, 256, 512, 768, 2048]
    assert len({bucket(n, minimum=64) for n in range(1, 2049)}) == 10


# ---------------------------------------------------------------------------------------------------
# The CLI and evaluation on a training checkpoint
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A training run directory of the tiny model with a SentencePiece tokenizer, its train state saved by
    the train CLI's `CheckpointStore` (random weights set directly: neither training steps nor the
    initialiser's compiles would add anything to these tests), plus two images and a caption shard."""
    from PIL import Image

    from data_pipelines.synthetic import train_tokenizer
    from data_pipelines.writer import write_caption_shards
    from helpers import random_canonical_params
    from owl_jax.checkpoint import CheckpointStore
    from owl_jax.config import load_config
    from owl_jax.convert.state import assign_canonical_params, canonical_shapes
    from owl_jax.sharding import make_mesh
    from owl_jax.training.train_step import abstract_train_state

    root = tmp_path_factory.mktemp("gen_run")
    lines = ["a red circle on the left", "a green square", "what is in the picture", "Human: what is it? AI: a dog"]
    (root / "spm.model").write_bytes(train_tokenizer(lines * 40, 300))
    cfg = load_config(os.path.join(ROOT, "configs/tiny_test.yaml"), [
        f"data.tokenizer={root / 'spm.model'}", "data.system_prompt=''", f"training.output_dir={root / 'run'}",
        "mesh.fsdp=1", "data.seq_len=32"])
    graphdef, abstract, shardings, _, _ = abstract_train_state(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))

    def zeros(x, sharding):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.device_put(jax.random.wrap_key_data(np.zeros(x.shape + (2,), np.uint32)), sharding)
        return jax.device_put(np.zeros(x.shape, x.dtype), sharding)

    train_state = nnx.merge(graphdef, jax.tree.map(zeros, abstract, shardings))
    assign_canonical_params(train_state.model, random_canonical_params(canonical_shapes(train_state.model), seed=0))
    store = CheckpointStore(root / "run", cfg, tokenizer_path=cfg.data.tokenizer)
    store.save(1, nnx.state(train_state), data_state={}, force=True)
    store.close()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(root / name)
    images = [Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)) for _ in range(3)]
    write_caption_shards(((f"{i:03d}", im, c) for i, (im, c) in enumerate(zip(images, lines))),
                         str(root / "cap-%03d.tar"), 8)
    return root


@pytest.fixture(scope="module")
def tiny_loaded(tiny_run):
    return load_for_inference(tiny_run / "run")


def test_cli_answers_a_prompt(tiny_run, tiny_loaded, capsys):
    args = ["--checkpoint", str(tiny_run / "run"), "--image", str(tiny_run / "a.png"), "--prompt", "what is it?",
            "--max-new-tokens", "6"]
    assert main(args) == 0
    answer = capsys.readouterr().out.strip()
    # the same answer through the API: the run's tokenizer and system prompt ("") came from the checkpoint
    from owl_jax.chat import ChatSession, load_image
    loaded = tiny_loaded
    assert loaded.kind == "run" and loaded.config.data.system_prompt == ""
    assert os.path.basename(loaded.config.data.tokenizer) == "spm.model"
    chat = ChatSession.for_config(loaded.config, loaded.tokenizer)
    chat.add_image(load_image(str(tiny_run / "a.png"), loaded))
    from owl_jax.generate import generator_for
    settings = GenerationSettings(max_new_tokens=6, stop_strings=("\nHuman:", "\nAI:"))
    assert chat.answer(generator_for(loaded), "what is it?", settings) == answer


def test_cli_interactive_chat(tiny_run, capsys, monkeypatch):
    """An input prompt before every line; an unknown command is reported, not asked; /reset keeps the
    --image picture (the same question then gets the same answer as at the start)."""
    script = ("what is it?\n/imag {b}\n/image {missing}\n/image\n/reset\nwhat is it?\n/image {b}\n"
              "what is in the picture?\n/quit\nnever read\n")
    monkeypatch.setattr(sys, "stdin", io.StringIO(script.format(b=tiny_run / "b.png", missing=tiny_run / "no.png")))
    assert main(["--checkpoint", str(tiny_run / "run"), "--image", str(tiny_run / "a.png"), "--interactive",
                 "--max-new-tokens", "4"]) == 0
    out, err = capsys.readouterr()
    answers = [line for line in out.splitlines() if line.startswith("AI: ")]
    assert len(answers) == 3 and answers[0] == answers[1]  # the reset conversation still has a.png
    assert "(new conversation; 1 image from --image kept)\n" in out and "(image 2 added)" in out
    assert err.count("Human: ") == 9  # a prompt before each of the 9 lines read (the 10th is never read)
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 3 and "unknown command /imag; commands: /image PATH, /reset, /quit" in errors[0]
    assert "no.png" in errors[1] and "/image needs a file" in errors[2] and "Traceback" not in err


def test_tokenizer_without_a_newline_piece_is_warned_about_once(tiny_run, tmp_path, capsys):
    """A SentencePiece model without byte fallback turns the template's line breaks into ⁇ (unk): the CLI
    says so once, before answering; the run's own tokenizer (byte fallback) gets no warning."""
    import sentencepiece as spm
    from owl_jax.chat import newline_warning
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["what is it? a red circle on the left"] * 20),
                                   model_writer=model, model_type="bpe", vocab_size=40, byte_fallback=False,
                                   normalization_rule_name="identity", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   num_threads=1, minloglevel=2)
    (tmp_path / "nonl.model").write_bytes(model.getvalue())
    assert "no piece for a newline" in newline_warning(load_tokenizer(tmp_path / "nonl.model"))
    assert newline_warning(load_tokenizer(tiny_run / "spm.model")) is None
    assert newline_warning(load_tokenizer("toy:512")) is None
    args = ["--checkpoint", str(tiny_run / "run"), "--prompt", "what is it?", "--max-new-tokens", "2"]
    assert main([*args, "--tokenizer", str(tmp_path / "nonl.model")]) == 0
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "'⁇'" in err
    assert main(args) == 0 and "warning" not in capsys.readouterr().err


def test_chat_history_in_the_official_template():
    from owl_jax.chat import ChatSession
    tok = load_tokenizer("toy:512")
    chat = ChatSession(tok, tokens_per_image=3, system="", max_context=64)
    chat.add_image(np.zeros((4, 4, 3), np.float32))
    assert chat.record("What is it?", "A fox.\nHuman: and more") == "A fox."
    prompt = chat.prompt("Colour?")
    turns = [(HUMAN, "<image>"), (HUMAN, "What is it?"), (AI, "A fox."), (HUMAN, "Colour?")]
    np.testing.assert_array_equal(prompt.tokens, to_prompt(turns, tok, 3, images=["x"], system=""))
    assert prompt.num_images == 1
    # too long for the context: the oldest question/answer go first, the image stays
    short = chat.prompt("Colour? " + "word " * 40, max_new_tokens=10)
    assert (short.tokens == -1).sum() == 3 and len(short.tokens) + 10 <= 64


@pytest.mark.parametrize("case", ["missing", "not_a_checkpoint", "missing_image", "text_only_image", "both_modes"])
def test_cli_user_errors_exit_2(tiny_run, hf_llama, tmp_path, capsys, case):
    args = {"missing": ["--checkpoint", str(tmp_path / "nope"), "--prompt", "hi"],
            "not_a_checkpoint": ["--checkpoint", str(tmp_path), "--prompt", "hi"],
            "missing_image": ["--checkpoint", str(tiny_run / "run"), "--image", str(tmp_path / "x.jpg"), "--prompt", "hi"],
            "text_only_image": ["--checkpoint", str(hf_llama[2]), "--tokenizer", "toy:512", "--image",
                                str(tiny_run / "a.png"), "--prompt", "hi"],
            "both_modes": ["--checkpoint", str(tiny_run / "run"), "--prompt", "hi", "--interactive"]}[case]
    expect = {"missing": "does not exist", "not_a_checkpoint": "neither a training run", "missing_image": "x.jpg",
              "text_only_image": "text-only", "both_modes": "not allowed with"}[case]
    try:
        code = main(args)
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and expect in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 or case == "both_modes"


def test_cli_as_a_command(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "owl_jax.generate", "--checkpoint", str(tmp_path / "nope"),
                           "--prompt", "hi"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


class _RecordingGenerator:
    """Stands in for a Generator: records the prompts and answers "answer N"."""

    def __init__(self):
        self.prompts: list[Prompt] = []

    def generate(self, prompts, settings):
        self.prompts += prompts
        return [Generation([], f"answer {len(self.prompts) - len(prompts) + i}", "eos") for i in range(len(prompts))]


def test_owleval_dialogues_in_question_id_order_with_history(tmp_path):
    from owl_jax.config import Config
    from owl_jax.evaluate import owleval_answers
    from PIL import Image
    cfg = Config()
    cfg.data.system_prompt = ""
    cfg.model.vision.image_size, cfg.model.abstractor.num_queries = 14, 2
    for name in ("1.jpg", "2.jpg"):
        Image.new("RGB", (20, 20), "red").save(tmp_path / name)
    questions = [{"image": "1.jpg", "question_id": "1-10", "question": "third?"},
                 {"image": "2.jpg", "question_id": 7, "question": "only?", "extra": 1},
                 {"image": "1.jpg", "question_id": "1-2", "question": "second?"},
                 {"image": "1.jpg", "question_id": "1-1", "question": "first?"}]
    tok = load_tokenizer("toy:512")
    generator = _RecordingGenerator()
    answers = owleval_answers(cfg, None, tok, questions, str(tmp_path), model_id="m", generator=generator)
    assert [list(a) for a in answers] == [["image", "question_id", "question", "answer", "model_id"]] * 4
    assert [a["question_id"] for a in answers] == ["1-10", 7, "1-2", "1-1"]  # input order
    # round 1 asked 1-1 and 7 together, then 1-2, then 1-10, each after the earlier turns of its image
    by_id = {a["question_id"]: a["answer"] for a in answers}
    assert by_id == {"1-1": "answer 0", 7: "answer 1", "1-2": "answer 2", "1-10": "answer 3"}
    last = generator.prompts[-1].tokens
    history = [(HUMAN, "<image>"), (HUMAN, "first?"), (AI, "answer 0"), (HUMAN, "second?"), (AI, "answer 2"),
               (HUMAN, "third?")]
    np.testing.assert_array_equal(last, to_prompt(history, tok, 3, images=["x"], system=""))


def test_evaluate_owleval_cli(tiny_run, tmp_path):
    from owl_jax.evaluate import main as evaluate
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps(q) + "\n" for q in [
        {"image": "a.png", "question_id": 2, "question": "what is in the picture?", "type": "x"},
        {"image": "a.png", "question_id": 1, "question": "what is it?", "type": "x"}]))
    out = tmp_path / "answers.jsonl"
    assert evaluate(["--checkpoint", str(tiny_run / "run"), "--task", "owleval", "--questions", str(questions),
                     "--image-root", str(tiny_run), "--out", str(out), "--max-new-tokens", "1"]) == 0
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert [a["question_id"] for a in answers] == [2, 1]  # input order
    assert [list(a) for a in answers] == [["image", "question_id", "question", "answer", "model_id"]] * 2
    assert all(a["model_id"] == "run" and a["image"] == "a.png" and isinstance(a["answer"], str) for a in answers)


def test_vqa_exact_match_of_generated_answers(tiny_run, tiny_loaded):
    from owl_jax.evaluate import generated_answer_accuracy, normalize_answer
    cfg, model, tok = tiny_loaded.config, tiny_loaded.model, tiny_loaded.tokenizer
    questions = [{"image": "a.png", "question": "what is it?", "answer": "a dog.", "choices": ["a dog.", "a cat."],
                  "kind": "x"},
                 {"image": "b.png", "question": "what is it?", "answer": "a cat.", "choices": ["a dog.", "a cat."],
                  "kind": "x"}]
    generator = Generator(model, tok, tokens_per_image=9, image_size=56)
    settings = GenerationSettings(max_new_tokens=4)
    r = generated_answer_accuracy(cfg, model, tok, questions, str(tiny_run), settings=settings, batch_size=1,
                                  generator=generator)
    assert r["x"]["count"] == r["all"]["count"] == 2 and r["all"]["chance"] == 0.5
    # exact match against what the model says (normalised): make the first reference the model's answer
    from owl_jax.chat import ChatSession, read_image
    chat = ChatSession.for_config(cfg, tok)
    chat.add_image(read_image(str(tiny_run / "a.png"), 56))
    said = chat.answer(generator, "what is it?", settings)
    questions[0]["answer"] = said.upper() + " ."
    r = generated_answer_accuracy(cfg, model, tok, questions[:1], str(tiny_run), settings=settings, batch_size=1,
                                  generator=generator)
    assert r["all"]["accuracy"] == (1.0 if normalize_answer(said) else r["all"]["accuracy"])
    assert normalize_answer("  On the LEFT. ") == "on the left"


def test_caption_perplexity(tiny_run, tiny_loaded):
    from owl_jax.evaluate import caption_perplexity
    cfg, model, tok = tiny_loaded.config, tiny_loaded.model, tiny_loaded.tokenizer
    r = caption_perplexity(cfg, model, tok, [str(tiny_run / "cap-000.tar")], batch_size=2)
    lines = ["a red circle on the left", "a green square", "what is in the picture"]
    assert r["samples"] == 3 and r["tokens"] == sum(len(tok.encode(c)) + 1 for c in lines)  # captions + EOS
    assert r["perplexity"] == pytest.approx(np.exp(r["nll"])) and 1.0 < r["perplexity"] < 10 * tok.vocab_size
    assert caption_perplexity(cfg, model, tok, [str(tiny_run / "cap-000.tar")], batch_size=2, limit=1)["samples"] == 1
