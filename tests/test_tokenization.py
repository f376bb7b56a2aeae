"""Tokenisation of instruction data: the official mPLUG-Owl pipeline reproduced exactly on the golden
cases, our tokenizers, the per-source conversation readers, and our truncation."""

import io
import json
import zlib

import numpy as np
import pytest

from data_pipelines.conversation import (AI, HUMAN, SYSTEM_PROMPT, BadRecord, Conversation, Turn, from_alpaca,
                                         from_baize, from_llava, from_official, from_sharegpt, make_conversation,
                                         parse_official_text, read_record, render)
from data_pipelines.tokenize import IMAGE_ID, tokenize_conversation, to_training_sample
from data_pipelines.tokenizers import (HFJsonTokenizer, SentencePieceTokenizer, Tokenizer, ToyWordTokenizer,
                                       load_tokenizer)

TPI = 9  # tiny golden config: 8 queries + vit_eos
MASKS = ("input_ids", "non_padding_mask", "non_media_mask", "prompt_mask")


@pytest.fixture(scope="module")
def meta(golden_dir):
    return json.loads((golden_dir / "meta.json").read_text())


@pytest.fixture(scope="module")
def toy(meta):
    return ToyWordTokenizer(meta["tiny_config"]["text"]["vocab_size"])


# ---------------------------------------------------------------------------------------------------
# Golden reproduction of the official pipeline
# ---------------------------------------------------------------------------------------------------

def test_toy_tokenizer_is_the_documented_one(toy):
    assert (toy.pad_id, toy.bos_id, toy.eos_id, toy.vocab_size) == (0, 1, 2, 512)
    assert toy.encode("AI: hi\n") == [3 + zlib.crc32(p.encode()) % 509 for p in ["AI", ":", "hi", "\n"]]
    assert isinstance(toy, Tokenizer)


def test_official_tokenisation_reproduces_inputs_npz(golden_dir, meta, toy):
    inputs = np.load(golden_dir / "inputs.npz")
    for i, record in enumerate(meta["records"]):
        got = tokenize_conversation(record["text"], toy, meta["max_length"], TPI)
        for key in MASKS:
            np.testing.assert_array_equal(getattr(got, key), inputs[key][i], err_msg=f"record {i} {key}")
        assert got.seq_length == inputs["seq_length"][i]
        np.testing.assert_array_equal(got.labels, inputs["labels"][i])
        assert (got.input_ids < 0).sum() == TPI * inputs["num_images"][i]


def test_official_tokenisation_reproduces_all_pipeline_cases(golden_dir, meta, toy):
    cases = np.load(golden_dir / "pipeline_cases.npz")
    ks = sorted({int(name.split("_")[0][4:]) for name in cases.files})
    assert len(ks) == len(meta["truncation_cases"]) == 3
    for k in ks:
        record = meta["records"][int(cases[f"case{k}_record"])]
        max_length = int(cases[f"case{k}_max_length"])
        assert [int(cases[f"case{k}_record"]), max_length] == meta["truncation_cases"][k]
        got = tokenize_conversation(record["text"], toy, max_length, TPI)
        for key in MASKS:
            np.testing.assert_array_equal(getattr(got, key), cases[f"case{k}_{key}"], err_msg=f"case{k} {key}")
        assert got.seq_length == int(cases[f"case{k}_seq_length"])


def test_official_first_chunk_overflow_is_bad_record(toy):
    with pytest.raises(BadRecord, match="max_length"):
        tokenize_conversation(SYSTEM_PROMPT + "\nHuman: hi\nAI: yo", toy, 10, TPI)


def test_training_sample_equals_official_when_it_fits(golden_dir, meta, toy):
    inputs = np.load(golden_dir / "inputs.npz")
    outputs = np.load(golden_dir / "outputs.npz")
    for i, record in enumerate(meta["records"]):
        s = to_training_sample(from_official(record), toy, meta["max_length"] + 1, TPI)
        n = int(inputs["seq_length"][i])
        ids = inputs["input_ids"][i]
        assert len(s) == n and not s.truncated
        np.testing.assert_array_equal(s.tokens, ids[:n])
        np.testing.assert_array_equal(s.targets[:-1], np.where(ids[1:n] < 0, 0, ids[1:n]))
        assert s.targets[-1] == toy.pad_id and not s.loss_mask[-1]
        np.testing.assert_array_equal(s.loss_mask[:-1], inputs["prompt_mask"][i][:n - 1].astype(bool))
        # ... which is exactly where the official model counts loss
        np.testing.assert_array_equal(s.loss_mask[:-1], outputs["labels_masked"][i][1:n] != -100)
        assert s.num_images == inputs["num_images"][i] and s.images == tuple(record.get("image", ()))
        # the text path parses to the same sample
        s2 = to_training_sample(record["text"], toy, meta["max_length"] + 1, TPI, images=record.get("image", ()))
        np.testing.assert_array_equal(s2.tokens, s.tokens)


# ---------------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------------

SENTENCES = [SYSTEM_PROMPT, "Human: Where is the man located in the image?",
             "AI: The man is located in a small restaurant, sitting and enjoying his meal.",
             "She shuddered at the thought of being alone in the dark.", "Did he shudder when the door creaked?",
             "Do the shirts worn by the individuals in the first and second pictures vary in color?"] * 4


@pytest.fixture(scope="module")
def sp_path(tmp_path_factory):
    import sentencepiece as spm
    model = io.BytesIO()
    # LLaMA-like settings: byte fallback, no normalisation, whitespace kept, unk 0 / bos 1 / eos 2 / no pad
    spm.SentencePieceTrainer.train(sentence_iterator=iter(SENTENCES), model_writer=model, vocab_size=340,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   minloglevel=2)
    path = tmp_path_factory.mktemp("sp") / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path


def _train_bpe(folder, config=None, special_map=None):
    from tokenizers import Tokenizer as HFTok, decoders, models, pre_tokenizers, trainers
    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|pad|>", "<|begin_of_text|>", "<|end_of_text|>"]
    tok.train_from_iterator(SENTENCES, trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                           show_progress=False))
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    if special_map is not None:
        (folder / "special_tokens_map.json").write_text(json.dumps(special_map))
    return folder / "tokenizer.json", tok


def test_sentencepiece_tokenizer(sp_path):
    tok = SentencePieceTokenizer(sp_path)
    assert isinstance(tok, Tokenizer)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 0, 340)  # no pad piece -> 0
    for text in ["Where is the man?\n", "Unseen wörds: 漢字 ok", "AI: x"]:
        ids = tok.encode(text)
        assert tok.bos_id not in ids and tok.eos_id not in ids
        assert tok.decode(ids) == text
    assert tok.encode("") == []
    assert SentencePieceTokenizer(sp_path, pad_id=5).pad_id == 5
    assert isinstance(load_tokenizer(sp_path), SentencePieceTokenizer)
    assert isinstance(load_tokenizer(sp_path.parent), SentencePieceTokenizer)


def test_hf_json_tokenizer(tmp_path):
    path, raw = _train_bpe(tmp_path / "a", config={"bos_token": {"content": "<|begin_of_text|>", "lstrip": False},
                                                   "eos_token": "<|end_of_text|>"})
    tok = HFJsonTokenizer(path)
    assert isinstance(tok, Tokenizer)
    assert tok.bos_id == raw.token_to_id("<|begin_of_text|>") and tok.eos_id == raw.token_to_id("<|end_of_text|>")
    assert tok.pad_id == tok.eos_id  # no pad token defined -> EOS (LLaMA-3 has none)
    assert tok.vocab_size == raw.get_vocab_size(with_added_tokens=True)
    for text in ["Where is the man?\n", "Unseen wörds: 漢字 ok", " AI: x"]:
        ids = tok.encode(text)
        assert tok.bos_id not in ids and tok.eos_id not in ids
        assert tok.decode(ids) == text
    assert tok.encode("") == []
    assert isinstance(load_tokenizer(path), HFJsonTokenizer)
    assert isinstance(load_tokenizer(path.parent), HFJsonTokenizer)
    # explicit arguments win; special_tokens_map.json is the fallback; pad from the files
    assert HFJsonTokenizer(path, eos_token="<|pad|>").eos_id == raw.token_to_id("<|pad|>")
    path_b, _ = _train_bpe(tmp_path / "b", special_map={"eos_token": "<|end_of_text|>", "pad_token": "<|pad|>"})
    tok_b = HFJsonTokenizer(path_b)
    assert tok_b.bos_id is None and tok_b.eos_id == raw.token_to_id("<|end_of_text|>")
    assert tok_b.pad_id == raw.token_to_id("<|pad|>")
    # without any EOS, or with an unknown special token: clear errors
    path_c, _ = _train_bpe(tmp_path / "c")
    with pytest.raises(ValueError, match="EOS"):
        HFJsonTokenizer(path_c)
    with pytest.raises(ValueError, match="not in the vocabulary"):
        HFJsonTokenizer(path_c, eos_token="<nope>")


def test_tokenizers_plug_into_the_pipeline(sp_path, tmp_path):
    """Real subword tokenizers through both paths: BOS first, EOS after each answer, images as slots."""
    hf_path, _ = _train_bpe(tmp_path, config={"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"})
    text = (SYSTEM_PROMPT + "\nHuman: <image>\nHuman: Where is the man?\nAI: In a restaurant.\n"
            "Human: Is he alone?\nAI: Yes.")
    for tok in (load_tokenizer(sp_path), load_tokenizer(hf_path)):
        official = tokenize_conversation(text, tok, 200, TPI)
        ids = official.input_ids[:official.seq_length]
        assert ids[0] == tok.bos_id and (ids == tok.eos_id).sum() == 2 and ids[-1] == tok.eos_id
        assert (ids == IMAGE_ID).sum() == TPI
        s = to_training_sample(text, tok, 201, TPI, images=["a.jpg"])
        np.testing.assert_array_equal(s.tokens, ids)
        np.testing.assert_array_equal(s.loss_mask[:-1], official.prompt_mask[:len(s) - 1].astype(bool))
        answer = tok.decode(s.tokens[1:][s.loss_mask[:-1]].tolist())
        assert "restaurant" in answer and "Yes" in answer and "alone" not in answer


@pytest.mark.parametrize("system", ["", SYSTEM_PROMPT])
def test_conversation_style_caption_template_tokenises_like_the_conversation(sp_path, tmp_path, system):
    """A stage-1 caption template in the conversation format gives the frozen LLM exactly the ids (role
    markers included) and answer weighting of the same exchange in instruction data. SentencePiece splits
    "\\nAI: " differently when encoded as one string, which this would catch."""
    from data_pipelines.captions import CaptionTokenizer
    from data_pipelines.conversation import make_conversation
    hf_path, _ = _train_bpe(tmp_path, config={"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"})
    caption = "The man is sitting in a small restaurant"
    template = (system + "\n" if system else "") + "Human: <image>\nAI: {caption}"
    for tok in (load_tokenizer(sp_path), load_tokenizer(hf_path)):
        tokens, weighted = CaptionTokenizer(tok, template, TPI)(caption, 200)
        conv = make_conversation([(HUMAN, "<image>"), (AI, caption)], images=["a.jpg"], system=system)
        s = to_training_sample(conv, tok, 200, TPI, images=conv.images)
        np.testing.assert_array_equal(tokens, s.tokens)
        np.testing.assert_array_equal(weighted[1:], s.loss_mask[:len(tokens) - 1])  # mask is per target


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.model"):
        load_tokenizer(tmp_path / "nowhere.model")
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_tokenizer(tmp_path)  # a folder with neither file
    (tmp_path / "vocab.txt").write_text("a\nb\n")
    with pytest.raises(ValueError, match="vocab.txt"):
        load_tokenizer(tmp_path / "vocab.txt")
    (tmp_path / "broken.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="broken.model"):
        load_tokenizer(tmp_path / "broken.model")
    (tmp_path / "broken.json").write_text("{}")
    with pytest.raises(ValueError, match="broken.json"):
        load_tokenizer(tmp_path / "broken.json")
    assert isinstance(load_tokenizer("toy:512"), ToyWordTokenizer)


# ---------------------------------------------------------------------------------------------------
# Conversation readers
# ---------------------------------------------------------------------------------------------------

def test_official_records_round_trip(meta):
    for record in meta["records"]:
        conv = from_official(record)
        assert render(conv) == record["text"]
        assert conv.images == tuple(record.get("image", ()))
        assert conv.system == SYSTEM_PROMPT
    two = from_official(meta["records"][2])
    assert [t.role for t in two.turns] == [HUMAN, HUMAN, HUMAN, AI]
    assert [t.text for t in two.turns[:2]] == ["<image>", "<image>"]
    multi = from_official(meta["records"][0])
    assert [t.role for t in multi.turns] == [HUMAN, AI, HUMAN, AI]
    assert multi.turns[0].text == "Construct a sentence using the given verb in the past tense\nshudder"
    # a text without a system prompt round-trips too
    bare = "Human: hi\nAI: hello"
    assert render(parse_official_text(bare)).startswith("Human: hi") and render(parse_official_text(bare)) == bare


def test_llava_reader(meta):
    record = {"id": "0001", "image": "a.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhere is the man located in the image?"},
        {"from": "gpt", "value": "The man is located in a small restaurant, sitting and enjoying his meal."}]}
    conv = from_llava(record)
    assert render(conv) == meta["records"][1]["text"] and conv.images == ("a.jpg",)
    multi = from_llava({"image": ["b.jpg", "c.jpg"], "conversations": [
        {"from": "human", "value": "Do the shirts worn by the individuals in the first and second pictures vary "
                                   "in color?\n<image>\n<image>"},
        {"from": "gpt", "value": "Yes, the first shirt is red and the second one is blue."},
        {"from": "human", "value": "Which is brighter?"}, {"from": "gpt", "value": "The red one."}]})
    assert render(multi) == meta["records"][2]["text"] + "\nHuman: Which is brighter?\nAI: The red one."
    assert multi.num_images == 2 and [t.role for t in multi.turns] == [HUMAN, HUMAN, HUMAN, AI, HUMAN, AI]
    text_only = from_llava({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]})
    assert text_only.images == () and render(text_only) == SYSTEM_PROMPT + "\nHuman: Hi\nAI: Hello"


def test_alpaca_reader(meta):
    conv = from_alpaca({"instruction": "Construct a sentence using the given verb in the past tense",
                        "input": "shudder", "output": "She shuddered at the thought of being alone in the dark."})
    assert render(conv) == meta["records"][0]["text"].split("\nHuman: Now")[0]
    plain = from_alpaca({"instruction": "Say hi.", "input": "", "output": "Hi."})
    assert render(plain) == SYSTEM_PROMPT + "\nHuman: Say hi.\nAI: Hi."
    assert render(from_alpaca({"instruction": "Say hi.", "output": "Hi."})) == render(plain)


def test_sharegpt_reader():
    msgs = [("human", "Hi"), ("gpt", "Hello!"), ("user", "And?"), ("assistant", "More."), ("human", "x"),
            ("chatgpt", "y"), ("human", "z"), ("bard", "w")]
    conv = from_sharegpt({"id": "a", "conversations": [{"from": f, "value": v} for f, v in msgs]})
    assert [(t.role, t.text) for t in conv.turns] == [(HUMAN if i % 2 == 0 else AI, v)
                                                      for i, (_, v) in enumerate(msgs)]
    assert render(conv) == SYSTEM_PROMPT + "".join(
        f"\n{'Human' if i % 2 == 0 else 'AI'}: {v}" for i, (_, v) in enumerate(msgs))
    with_system = from_sharegpt({"conversations": [{"from": "system", "value": "Be terse."},
                                                   {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]})
    assert render(with_system) == "Be terse.\nHuman: Hi\nAI: Yo"
    assert read_record({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
                       "vicuna").turns == (Turn(HUMAN, "a"), Turn(AI, "b"))


def test_baize_reader():
    record = {"topic": "How do I learn Python?",
              "input": "The conversation between human and AI assistant.\n[|Human|] How do I learn Python?\n"
                       "[|AI|] Start with the official tutorial.\n[|Human|] Then?\n[|AI|] Build small projects.\n"
                       "[|Human|] "}
    conv = from_baize(record)
    assert [(t.role, t.text) for t in conv.turns] == [
        (HUMAN, "How do I learn Python?"), (AI, "Start with the official tutorial."), (HUMAN, "Then?"),
        (AI, "Build small projects.")]
    assert conv.system == SYSTEM_PROMPT and read_record(record, "baize") == conv


def _msgs(*pairs):
    return {"conversations": [{"from": f, "value": v} for f, v in pairs]}


BAD = [
    ("official", {"image": ["a.jpg"]}, "missing field"),
    ("official", {"text": 5}, "not str"),
    ("official", "a string", "not an object"),
    ("official", {"text": SYSTEM_PROMPT + "\nHuman: <image>\nHuman: q\nAI: a"}, "1 <image> tags but 0 images"),
    ("official", {"text": SYSTEM_PROMPT + "\nHuman: q\nAI: a", "image": ["a.jpg"]}, "0 <image> tags but 1 images"),
    ("official", {"text": SYSTEM_PROMPT + "\nHuman: q\nAI: a", "image": [3]}, "list of strings"),
    ("official", {"text": SYSTEM_PROMPT + "\nAI: a\nHuman: q\nAI: b"}, "starts with an AI turn"),
    ("official", {"text": SYSTEM_PROMPT + "\nHuman: q\nAI: a\nAI: b"}, "both AI"),
    ("official", {"text": SYSTEM_PROMPT + "\nHuman: q\nAI: a\nHuman: q2"}, "ends with a human turn"),
    ("official", {"text": SYSTEM_PROMPT + "\nHuman: q\nAI: look <image>", "image": ["a.jpg"]}, "<image> in an AI"),
    ("official", {"text": SYSTEM_PROMPT + "\nHuman: q\nAI:  "}, "empty ai turn"),
    ("official", {"text": "just text"}, "no 'Human: '"),
    ("alpaca", {"instruction": "do it"}, "missing field"),
    ("alpaca", {"instruction": "do it", "output": 3}, "must be strings"),
    ("alpaca", {"instruction": "do it", "output": ""}, "empty ai turn"),
    ("sharegpt", {"id": 1}, "missing field"),
    ("sharegpt", {"conversations": "hi"}, "non-empty list"),
    ("sharegpt", _msgs(("gpt", "hello"), ("human", "hi")), "both|starts with an AI"),
    ("sharegpt", _msgs(("human", "a"), ("human", "b"), ("gpt", "c")), "both human"),
    ("sharegpt", _msgs(("human", "a"), ("gpt", "b"), ("gpt", "c")), "both ai"),
    ("sharegpt", _msgs(("human", "a"), ("gpt", "b"), ("human", "c")), "ends with a human"),
    ("sharegpt", _msgs(("human", "a"), ("robot", "b")), "unknown speaker"),
    ("sharegpt", {"conversations": [{"from": "human"}]}, "lacks"),
    ("sharegpt", {"conversations": [{"from": "human", "value": None}]}, "must be strings"),
    ("sharegpt", _msgs(("human", "a\nAI: fake"), ("gpt", "b")), "role marker"),
    ("llava", {"image": "a.jpg", **_msgs(("human", "what?"), ("gpt", "a cat"))}, "0 <image> tags but 1 images"),
    ("llava", _msgs(("human", "<image>\nwhat?"), ("gpt", "a cat")), "1 <image> tags but 0 images"),
    ("llava", {"image": ["a.jpg"], **_msgs(("human", "<image> <image> what?"), ("gpt", "x"))}, "2 <image> tags"),
    ("llava", {"image": "a.jpg", **_msgs(("human", "<image>\nq"), ("gpt", "a"), ("gpt", "b"))}, "both ai"),
    ("baize", {"topic": "t"}, "missing field"),
    ("baize", {"input": "no markers at all"}, "no \\[\\|Human"),
    ("baize", {"input": "h\n[|Human|] a\n[|Human|] b\n[|AI|] c"}, "both human"),
    ("baize", {"input": "h\n[|AI|] a\n[|Human|] b\n[|AI|] c"}, "starts with an AI"),
    ("baize", {"input": "h\n[|Human|] a\n[|AI|]  \n[|Human|] "}, "empty ai turn"),
]


@pytest.mark.parametrize("source,record,reason", BAD, ids=[f"{s}-{i}" for i, (s, _, _) in enumerate(BAD)])
def test_bad_records(source, record, reason):
    with pytest.raises(BadRecord, match=reason) as info:
        read_record(record, source)
    assert info.value.reason == str(info.value)


def test_make_conversation_validates_and_unknown_source():
    with pytest.raises(BadRecord, match="unknown role"):
        make_conversation([("robot", "hi"), (AI, "x")])
    with pytest.raises(BadRecord, match="no turns"):
        make_conversation([])
    with pytest.raises(ValueError, match="unknown instruction source"):
        read_record({}, "dolly")


# ---------------------------------------------------------------------------------------------------
# Our truncation
# ---------------------------------------------------------------------------------------------------

TWO_IMAGE_TWO_ANSWERS = make_conversation(
    [(HUMAN, "<image>"), (HUMAN, "What is in the first picture?"), (AI, "A red shirt on a chair."),
     (HUMAN, "<image>"), (HUMAN, "And in the second one?"), (AI, "A blue shirt hanging on the door.")],
    images=["b.jpg", "c.jpg"])


def _reference(conv, tok):
    """The untruncated sample: ids, per-id answer label (answer tokens and their EOS), image starts."""
    full = to_training_sample(conv, tok, 10_000, TPI)
    ids = full.tokens
    labels = np.concatenate([[False], full.loss_mask[:-1]])
    starts = [i for i in range(len(ids)) if ids[i] < 0 and (i == 0 or ids[i - 1] >= 0)]
    return ids, labels, starts


def _negative_runs(ids):
    runs, i = [], 0
    while i < len(ids):
        if ids[i] < 0:
            j = i
            while j < len(ids) and ids[j] < 0:
                j += 1
            runs.append((i, j - i))
            i = j
        else:
            i += 1
    return runs


@pytest.mark.parametrize("conv_name", ["two_images", "golden_text", "golden_two_images"])
def test_truncation_invariants_at_every_length(conv_name, meta, toy):
    conv = {"two_images": TWO_IMAGE_TWO_ANSWERS, "golden_text": from_official(meta["records"][0]),
            "golden_two_images": from_official(meta["records"][2])}[conv_name]
    ids, labels, starts = _reference(conv, toy)
    first_answer = int(np.flatnonzero(labels)[0])
    for seq_len in range(1, len(ids) + 3):
        if seq_len < first_answer + 2:  # not even one answer token + EOS fits
            with pytest.raises(BadRecord, match="too long"):
                to_training_sample(conv, toy, seq_len, TPI)
            continue
        s = to_training_sample(conv, toy, seq_len, TPI)
        n = len(s)
        assert n <= seq_len and s.truncated == (seq_len < len(ids))
        # image slots are never split and the image list is the images kept, in order
        runs = _negative_runs(s.tokens)
        assert all(length == TPI for _, length in runs) and len(runs) == s.num_images
        assert s.images == conv.images[:s.num_images]
        # a prefix of the full sample, except a cut answer's last kept id, which becomes EOS
        np.testing.assert_array_equal(s.tokens[:-1], ids[:n - 1])
        assert s.tokens[-1] == toy.eos_id
        cut_answer = n < len(ids) and labels[n - 1] and labels[n]
        assert s.tokens[-1] == ids[n - 1] or cut_answer
        # loss exactly on the answers (and their EOS) that were kept
        np.testing.assert_array_equal(s.loss_mask[:-1], labels[1:n])
        assert not s.loss_mask[-1]
        np.testing.assert_array_equal(s.targets[:-1], np.where(s.tokens[1:] < 0, toy.pad_id, s.tokens[1:]))
        # a cut answer keeps at least one of its tokens before the EOS
        if cut_answer:
            assert labels[n - 2] and ids[n - 2] != toy.eos_id


def test_cut_inside_second_image_drops_it(toy):
    ids, labels, starts = _reference(TWO_IMAGE_TWO_ANSWERS, toy)
    second = starts[1]
    s = to_training_sample(TWO_IMAGE_TWO_ANSWERS, toy, second + 4, TPI)
    assert s.images == ("b.jpg",) and (s.tokens < 0).sum() == TPI
    first_answer_end = int(np.flatnonzero(labels[:second])[-1])  # the first answer's EOS
    assert len(s) == first_answer_end + 1 and s.tokens[-1] == toy.eos_id
    assert s.loss_mask.sum() == labels[:second].sum()


def test_cut_answer_keeps_eos(toy):
    ids, labels, _ = _reference(TWO_IMAGE_TWO_ANSWERS, toy)
    last = np.flatnonzero(labels)
    second_answer_start = last[np.flatnonzero(np.diff(last) > 1)[0] + 1]
    seq_len = second_answer_start + 3  # two answer tokens kept, the third position becomes EOS
    s = to_training_sample(TWO_IMAGE_TWO_ANSWERS, toy, seq_len, TPI)
    assert len(s) == seq_len and s.images == ("b.jpg", "c.jpg") and s.truncated
    np.testing.assert_array_equal(s.tokens[:-1], ids[:seq_len - 1])
    assert s.tokens[-1] == toy.eos_id != ids[seq_len - 1]
    assert s.loss_mask[-2] and s.targets[-2] == toy.eos_id
    # a cut that would leave the answer empty (only the EOS) drops it instead
    s1 = to_training_sample(TWO_IMAGE_TWO_ANSWERS, toy, second_answer_start + 1, TPI)
    assert s1.tokens[-1] == toy.eos_id and s1.loss_mask.sum() == labels[:second_answer_start].sum()
    assert len(s1) < second_answer_start


def test_golden_truncation_cases_are_rejected_or_fixed(meta, toy):
    """The official code turns all three golden truncation cases into samples without a loss token (and
    case1 keeps 2 images for 0 slots); ours rejects them — the first answer never fits."""
    for record, max_length in meta["truncation_cases"]:
        with pytest.raises(BadRecord, match="too long"):
            to_training_sample(from_official(meta["records"][record]), toy, max_length + 1, TPI)


def test_structural_split_keeps_answers_whole(toy):
    """'AI: ' inside an answer: the official regex split ends the answer there with a stray EOS."""
    text = SYSTEM_PROMPT + "\nHuman: Who made you?\nAI: OpenAI: no, mPLUG."
    official = tokenize_conversation(text, toy, 200, TPI)
    assert (official.input_ids == toy.eos_id).sum() == 2
    ours = to_training_sample(text, toy, 201, TPI)
    assert (ours.tokens == toy.eos_id).sum() == 1 and ours.tokens[-1] == toy.eos_id
    answer = toy.encode("OpenAI: no, mPLUG.") + [toy.eos_id]
    np.testing.assert_array_equal(ours.tokens[1:][ours.loss_mask[:-1]], answer)


def test_adjacent_images_rejected(toy):
    conv = make_conversation([(HUMAN, "<image><image>compare"), (AI, "same")], images=["a", "b"])
    with pytest.raises(BadRecord, match="two <image>"):
        to_training_sample(conv, toy, 500, TPI)
    ok = make_conversation([(HUMAN, "<image> vs <image>"), (AI, "same")], images=["a", "b"])
    assert len(_negative_runs(to_training_sample(ok, toy, 500, TPI).tokens)) == 2


def test_conversation_without_system_prompt(toy):
    conv = Conversation((Turn(HUMAN, "<image>"), Turn(HUMAN, "q?"), Turn(AI, "a.")), ("x.jpg",), system="")
    text = render(conv)
    assert text == "Human: <image>\nHuman: q?\nAI: a."
    official = tokenize_conversation(text, toy, 40, TPI)
    ours = to_training_sample(conv, toy, 41, TPI)
    np.testing.assert_array_equal(ours.tokens, official.input_ids[:official.seq_length])
